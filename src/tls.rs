//! TLS and credential files shared by the etcd and Prometheus clients (features `etcd`
//! and `deploy`): PEM certificates and keys checked when they are read (so a bad file is
//! named before any connection), secrets read from files and never shown, and the
//! rustls failures of a handshake told apart.
//!
//! Invariant: a [`Secret`] has no `Display` and a redacted `Debug`, and no error built
//! here contains a file's content, so neither a log line nor an error message can carry
//! a password or a token.

use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A password or token read from a file. `Debug` shows `"<redacted>"`; there is no
/// `Display`: the value leaves only through [`Secret::expose`], to the client that sends it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    /// The secret itself, for the request that needs it (never for a message).
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// A file that could not be used: what it is, where, and why (never its content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileProblem {
    pub(crate) what: &'static str,
    pub(crate) path: PathBuf,
    pub(crate) reason: String,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, FileProblem> {
    std::fs::read(path).map_err(|e| FileProblem {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads a secret from `path`: the whole file, without one trailing line break (`\n` or
/// `\r\n`, as `echo` and editors leave it).
pub(crate) fn read_secret(what: &'static str, path: &Path) -> Result<Secret, FileProblem> {
    let problem = |reason: &str| FileProblem {
        what,
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let bytes = read(what, path)?;
    let mut text = String::from_utf8(bytes).map_err(|_| problem("not UTF-8 text"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(problem("empty"));
    }
    if text.contains(['\n', '\r']) {
        return Err(problem("more than one line"));
    }
    Ok(Secret(text))
}

/// Reads a PEM file that must hold at least one certificate; returns its bytes.
pub(crate) fn read_certs(what: &'static str, path: &Path) -> Result<Vec<u8>, FileProblem> {
    let bytes = read(what, path)?;
    let problem = |reason: String| FileProblem {
        what,
        path: path.to_owned(),
        reason,
    };
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        cert.map_err(|e| problem(format!("not a PEM certificate file: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(problem("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    Ok(bytes)
}

/// Reads a PEM file that must hold a private key (PKCS#8, PKCS#1 or SEC1); returns its bytes.
pub(crate) fn read_key(what: &'static str, path: &Path) -> Result<Vec<u8>, FileProblem> {
    let bytes = read(what, path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(_) => Ok(bytes),
        Err(e) => Err(FileProblem {
            what,
            path: path.to_owned(),
            // The pem error names the problem (no key found, bad base64), not the bytes.
            reason: format!("no usable PEM private key in it ({e})"),
        }),
    }
}

/// What went wrong in a TLS handshake, as far as it can be told apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TlsProblem {
    /// The server's certificate chain does not lead to a CA of the CA file.
    UnknownCa(String),
    /// The server's certificate has expired or is not valid yet.
    Expired(String),
    /// The server's certificate does not name the host or address connected to.
    Mismatch(String),
    /// The server wants a client certificate and got none.
    ClientCertificateRequired(String),
    /// The server refused the client certificate (expired, unknown CA, bad usage).
    ClientCertificateRejected(String),
    /// Any other TLS failure (e.g. `https://` to a plain-text server).
    Other(String),
}

/// The TLS failure somewhere in `err`'s chain of causes, if there is one. Looks through
/// `source()` links and through `std::io::Error` wrappers (tokio-rustls wraps rustls
/// errors in `io::Error`, whose `source()` skips the wrapped error).
pub(crate) fn tls_problem(err: &(dyn Error + 'static)) -> Option<TlsProblem> {
    typed_problem(err).or_else(|| text_problem(err))
}

/// The rustls error in the chain, by type.
fn typed_problem(err: &(dyn Error + 'static)) -> Option<TlsProblem> {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    let mut depth = 0;
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(classify_rustls(r));
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = typed_problem(inner) {
                return Some(found);
            }
        }
        depth += 1;
        if depth > 32 {
            break;
        }
        cur = e.source();
    }
    None
}

/// The rustls error in the chain, by its words: some layers (hyper, ureq) keep only the
/// message of the rustls error they wrap. Matches rustls 0.23's `Display`.
fn text_problem(err: &(dyn Error + 'static)) -> Option<TlsProblem> {
    let mut text = String::new();
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    let mut depth = 0;
    while let Some(e) = cur {
        text.push_str(&e.to_string());
        text.push('\n');
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            text.push_str(&inner.to_string());
            text.push('\n');
        }
        depth += 1;
        if depth > 32 {
            break;
        }
        cur = e.source();
    }
    let line = |needle: &str| text.lines().find(|l| l.contains(needle)).map(|l| l.trim().to_owned());
    if let Some(l) = line("invalid peer certificate") {
        let problem = if l.contains("UnknownIssuer") || l.contains("BadSignature") {
            TlsProblem::UnknownCa(l)
        } else if l.contains("xpired") || l.contains("NotValidYet") || l.contains("not valid before") {
            TlsProblem::Expired(l)
        } else if l.contains("NotValidForName") || l.contains("not valid for name") {
            TlsProblem::Mismatch(l)
        } else {
            TlsProblem::Other(l)
        };
        return Some(problem);
    }
    if let Some(l) = line("received fatal alert") {
        let problem = if l.contains("CertificateRequired") {
            TlsProblem::ClientCertificateRequired(l)
        } else if [
            "BadCertificate",
            "CertificateExpired",
            "CertificateRevoked",
            "CertificateUnknown",
            "UnknownCA",
            "UnsupportedCertificate",
            "AccessDenied",
        ]
        .iter()
        .any(|a| l.contains(a))
        {
            TlsProblem::ClientCertificateRejected(l)
        } else {
            TlsProblem::Other(l)
        };
        return Some(problem);
    }
    None
}

fn classify_rustls(e: &rustls::Error) -> TlsProblem {
    use rustls::{AlertDescription as A, CertificateError as C};
    let detail = e.to_string();
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => TlsProblem::UnknownCa(detail),
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
                TlsProblem::Expired(detail)
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => TlsProblem::Mismatch(detail),
            _ => TlsProblem::Other(detail),
        },
        rustls::Error::AlertReceived(A::CertificateRequired) => TlsProblem::ClientCertificateRequired(detail),
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnknownCA
            | A::UnsupportedCertificate
            | A::AccessDenied,
        ) => TlsProblem::ClientCertificateRejected(detail),
        _ => TlsProblem::Other(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_in_debug_and_loses_one_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cr3t-pass\r\n").unwrap();
        let s = read_secret("password file", &p).unwrap();
        assert_eq!(s.expose(), "s3cr3t-pass");
        assert!(!format!("{s:?}").contains("s3cr3t"));
        std::fs::write(&p, "\n").unwrap();
        assert_eq!(read_secret("password file", &p).unwrap_err().reason, "empty");
        std::fs::write(&p, "a\nb\n").unwrap();
        let e = read_secret("password file", &p).unwrap_err();
        assert_eq!(e.reason, "more than one line");
        assert!(!format!("{e:?}").contains("a\\nb"), "{e:?}");
    }

    #[test]
    fn pem_files_are_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "hello").unwrap();
        let e = read_certs("CA certificate file", &p).unwrap_err();
        assert!(e.reason.contains("no PEM certificate"), "{e:?}");
        let e = read_key("client key file", &p).unwrap_err();
        assert!(e.reason.contains("no usable PEM private key"), "{e:?}");
        let e = read_certs("CA certificate file", &dir.path().join("absent")).unwrap_err();
        assert_eq!(e.what, "CA certificate file");
    }

    #[test]
    fn rustls_failures_are_told_apart_through_io_wrappers() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        assert!(matches!(tls_problem(&wrapped), Some(TlsProblem::UnknownCa(_))));
        let required = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(matches!(
            tls_problem(&required),
            Some(TlsProblem::ClientCertificateRequired(_))
        ));
        let plain = std::io::Error::other("connection refused");
        assert_eq!(tls_problem(&plain), None);
        // Only the words left (hyper, ureq): still told apart.
        let words = std::io::Error::other("io: invalid peer certificate: UnknownIssuer");
        assert!(matches!(tls_problem(&words), Some(TlsProblem::UnknownCa(_))));
        let words = std::io::Error::other("received fatal alert: BadCertificate");
        assert!(matches!(
            tls_problem(&words),
            Some(TlsProblem::ClientCertificateRejected(_))
        ));
    }
}
