//! Building etcd connections (feature `etcd`): options, endpoint URLs, TLS and users,
//! lazily connected members, and the failures that retrying cannot fix.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::sync::Arc;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{AccessKind, EtcdAccessError, EtcdSecurity};
use crate::tls::{read_certs, read_key, read_secret, tls_problem, FileProblem, Secret, TlsProblem};

/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_ETCD_MAX_REQUEST_BYTES: usize = 1_572_864;

/// How a client talks to the cluster: timeouts, the request size limit, TLS and the user.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use erlmcp_rollout::etcd::{EtcdAuth, EtcdOptions, EtcdSecurity, EtcdTls};
/// let opts = EtcdOptions { request_timeout: Duration::from_millis(500), ..EtcdOptions::default() };
/// assert_eq!(opts.connect_timeout, Duration::from_secs(5));
/// assert!(!opts.security.is_tls());
/// let secured = EtcdOptions {
///     security: EtcdSecurity {
///         tls: Some(EtcdTls { ca_cert_file: "ca.pem".into(), cert_file: None, key_file: None }),
///         auth: Some(EtcdAuth { user: "erlmcp".into(), password_file: "etcd-password".into() }),
///     },
///     ..EtcdOptions::default()
/// };
/// assert!(secured.security.is_tls());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Time to open a connection to one member (default 5 s).
    pub connect_timeout: Duration,
    /// Time one request may take before it counts as failed (default 2 s).
    pub request_timeout: Duration,
    /// Time one call may spend retrying failed requests (on other members, after a
    /// leader election) before it gives up as unavailable (default 6 s, enough to ride
    /// out an election). Connecting uses the connect timeout instead.
    pub operation_timeout: Duration,
    /// The cluster's `--max-request-bytes` (default [`DEFAULT_ETCD_MAX_REQUEST_BYTES`]):
    /// larger session records are rejected before sending.
    pub max_request_bytes: usize,
    /// TLS and the etcd user (default: plain `http://`, no user).
    pub security: EtcdSecurity,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(6),
            max_request_bytes: DEFAULT_ETCD_MAX_REQUEST_BYTES,
            security: EtcdSecurity::default(),
        }
    }
}

/// gRPC status codes with which etcd refuses a request for good (retrying on another
/// member will not help): invalid argument, permission denied, failed precondition, out
/// of range, unimplemented, unauthenticated. Shared by every etcd client of the crate.
pub(crate) const REJECTED_GRPC_CODES: [i32; 6] = [3, 7, 9, 11, 12, 16];

/// How one connection is dialled: timeouts and HTTP/2 keep-alive (every connection
/// also requires a leader).
#[derive(Clone, Debug)]
pub(crate) struct Dial {
    pub(crate) connect_timeout: Duration,
    /// Timeout of each request (`None`: the caller bounds them).
    pub(crate) request_timeout: Option<Duration>,
    /// HTTP/2 keep-alive `(interval, timeout)`.
    pub(crate) keep_alive: Option<(Duration, Duration)>,
    /// Keep-alive pings also without open streams (watchers notice a dead member).
    pub(crate) keep_alive_while_idle: bool,
}

impl Dial {
    /// Only a connect timeout.
    pub(crate) fn new(connect_timeout: Duration) -> Dial {
        Dial {
            connect_timeout,
            request_timeout: None,
            keep_alive: None,
            keep_alive_while_idle: false,
        }
    }

    /// A long-lived client's dial (the session store, the phase store): `options`'
    /// connect and request timeouts, and an HTTP/2 ping every 2 s that must be answered
    /// within the request timeout, so a dead member's connection is dropped.
    pub(crate) fn requests(options: &EtcdOptions) -> Dial {
        Dial {
            request_timeout: Some(options.request_timeout),
            keep_alive: Some((Duration::from_secs(2), options.request_timeout)),
            ..Dial::new(options.connect_timeout)
        }
    }

    /// A watcher's dial: a ping every second, also while no request is open, answered
    /// within 2 s, so a watch on a dead member ends within about 3 s.
    pub(crate) fn watch(connect_timeout: Duration) -> Dial {
        Dial {
            keep_alive: Some((Duration::from_secs(1), Duration::from_secs(2))),
            keep_alive_while_idle: true,
            ..Dial::new(connect_timeout)
        }
    }
}

/// An endpoint that cannot be used: as given, and why.
#[derive(Debug)]
pub(crate) struct BadEndpoint {
    pub(crate) endpoint: String,
    pub(crate) reason: String,
}

/// `host:port`, `http://host:port` or `https://host:port` endpoints as the URLs
/// etcd-client takes: `host:port` is `https://` when `tls`, else `http://`; the scheme
/// must agree with `tls`.
pub(crate) fn endpoint_urls(endpoints: &[String], tls: bool) -> Result<Vec<String>, BadEndpoint> {
    if endpoints.is_empty() {
        return Err(BadEndpoint {
            endpoint: String::new(),
            reason: "no etcd endpoint given".into(),
        });
    }
    endpoints
        .iter()
        .map(|e| {
            let bad = |reason: &str| BadEndpoint {
                endpoint: e.clone(),
                reason: reason.to_owned(),
            };
            let (scheme, rest) = match e.split_once("://") {
                Some((s, r)) => (s, r),
                None => (if tls { "https" } else { "http" }, e.as_str()),
            };
            if rest.is_empty() || rest.starts_with('/') {
                return Err(bad("no host; expected host:port such as 127.0.0.1:2379"));
            }
            match (scheme, tls) {
                ("http", false) | ("https", true) => Ok(format!("{scheme}://{rest}")),
                ("http", true) => Err(bad(
                    "an http:// endpoint with TLS settings: use https:// or host:port (then https:// is used)",
                )),
                ("https", false) => Err(bad(
                    "an https:// endpoint needs the cluster's CA certificate file (TLS settings)",
                )),
                _ => Err(bad("expected host:port, http://host:port or https://host:port")),
            }
        })
        .collect()
}

/// Runs `fut` on `rt` and waits for it, from any thread: inside another tokio runtime
/// (where `block_on` would panic) it is spawned on `rt` and this thread waits on a
/// channel; `stopped` is the error when `rt` shuts down before answering.
pub(crate) fn run_on<T: Send + 'static, E: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, E>> + Send + 'static,
    stopped: impl FnOnce() -> E,
) -> Result<T, E> {
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(fut);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().unwrap_or_else(|_| Err(stopped()))
}

/// The TLS settings and credentials of [`EtcdSecurity`] with the files read: builds the
/// `ConnectOptions` of every connection. Its `Debug` shows the user, never the password.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: Option<TlsOptions>,
    /// The same TLS settings for the handshake probe (see [`Connector::connect`]).
    probe: Option<Arc<rustls::ClientConfig>>,
    /// Whether a client certificate is given.
    identity: bool,
    auth: Option<(String, Secret)>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .field("user", &self.auth.as_ref().map(|(u, _)| u))
            .finish()
    }
}

fn file_error(p: FileProblem) -> EtcdAccessError {
    EtcdAccessError {
        endpoint: String::new(),
        kind: AccessKind::File {
            what: p.what,
            path: p.path,
            reason: p.reason,
        },
    }
}

impl Connector {
    /// Reads (and checks) the files `security` names.
    pub(crate) fn new(security: &EtcdSecurity) -> Result<Connector, EtcdAccessError> {
        let tls = match &security.tls {
            None => None,
            Some(t) => {
                if t.cert_file.is_some() != t.key_file.is_some() {
                    return Err(EtcdAccessError {
                        endpoint: String::new(),
                        kind: AccessKind::Settings(
                            "a client certificate and its key go together: give both or neither".into(),
                        ),
                    });
                }
                let ca = read_certs("CA certificate file", &t.ca_cert_file).map_err(file_error)?;
                let mut identity = None;
                if let (Some(cert_file), Some(key_file)) = (&t.cert_file, &t.key_file) {
                    let cert = read_certs("client certificate file", cert_file).map_err(file_error)?;
                    let key = read_key("client key file", key_file).map_err(file_error)?;
                    identity = Some((cert, key, key_file.clone()));
                }
                let probe = probe_config(&ca, identity.as_ref(), &t.ca_cert_file)?;
                let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key, _)) = identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                Some((tls, probe))
            }
        };
        let identity = security.tls.as_ref().is_some_and(|t| t.cert_file.is_some());
        let (tls, probe) = match tls {
            Some((tls, probe)) => (Some(tls), Some(probe)),
            None => (None, None),
        };
        let auth = match &security.auth {
            None => None,
            Some(a) => {
                if a.user.is_empty() {
                    return Err(EtcdAccessError {
                        endpoint: String::new(),
                        kind: AccessKind::Settings("the etcd user name is empty".into()),
                    });
                }
                let password = read_secret("etcd password file", &a.password_file).map_err(file_error)?;
                Some((a.user.clone(), password))
            }
        };
        Ok(Connector {
            tls,
            probe,
            identity,
            auth,
        })
    }

    /// The user requests run as, if any.
    pub(crate) fn user(&self) -> Option<&str> {
        self.auth.as_ref().map(|(u, _)| u.as_str())
    }

    /// The endpoints as URLs whose scheme agrees with the TLS settings.
    pub(crate) fn urls(&self, endpoints: &[String]) -> Result<Vec<String>, BadEndpoint> {
        endpoint_urls(endpoints, self.tls.is_some())
    }

    /// etcd-client's options for `dial`, with this connector's TLS settings and user.
    /// With a user, expired or forgotten tokens (a restarted member) are renewed by
    /// etcd-client on demand.
    fn options(&self, dial: &Dial, with_user: bool) -> ConnectOptions {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(dial.connect_timeout)
            .with_require_leader(true)
            .with_keep_alive_while_idle(dial.keep_alive_while_idle);
        if let Some(t) = dial.request_timeout {
            opts = opts.with_timeout(t);
        }
        if let Some((interval, timeout)) = dial.keep_alive {
            opts = opts.with_keep_alive(interval, timeout);
        }
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.clone());
        }
        if let (Some((user, password)), true) = (&self.auth, with_user) {
            opts = opts
                .with_user(user.clone(), password.expose().to_owned())
                .with_auto_token_refresh(true);
        }
        opts
    }

    /// A client of the member at `url` (with a user, this authenticates: one round trip).
    ///
    /// With TLS, a probe connection first runs the handshake and the start of HTTP/2
    /// with the same settings: etcd-client's channel retries a refused handshake
    /// quietly (requests only time out), and with TLS 1.3 a server refuses a client
    /// certificate only after the client's side of the handshake is done. The probe's
    /// failure keeps its cause, which [`access_failure`] tells apart.
    pub(crate) async fn connect(&self, url: &str, dial: &Dial) -> Result<Client, etcd_client::Error> {
        if let Some(config) = &self.probe {
            probe(config, url, dial.connect_timeout)
                .await
                .map_err(etcd_client::Error::IoError)?;
        }
        Client::connect([url], Some(self.options(dial, true))).await
    }

    /// Checks that `url` and the TLS settings make a client, without any network traffic
    /// (no user: nothing is sent until the first request).
    pub(crate) async fn check(&self, url: &str, dial: &Dial) -> Result<(), etcd_client::Error> {
        Client::connect([url], Some(self.options(dial, false))).await.map(drop)
    }

    /// Checks, on `runtime`, that every one of `urls` makes a client with `dial` and
    /// these TLS settings (no network traffic); the first that does not, with why.
    pub(crate) fn check_all(
        &self,
        runtime: &tokio::runtime::Runtime,
        urls: &[String],
        dial: &Dial,
    ) -> Result<(), BadEndpoint> {
        for url in urls {
            runtime.block_on(self.check(url, dial)).map_err(|err| BadEndpoint {
                endpoint: url.clone(),
                reason: err.to_string(),
            })?;
        }
        Ok(())
    }

    /// The typed failure in `e`, if it is one retrying cannot fix (see [`access_failure`]).
    pub(crate) fn access_failure(&self, e: &etcd_client::Error, endpoint: &str) -> Option<EtcdAccessError> {
        let mut found = access_failure(e, endpoint, self.user())?;
        // A server that wants a client certificate and got none answers with the same
        // alert as for a bad one (Go: bad_certificate): we know which it was.
        if !self.identity && matches!(found.kind, AccessKind::ClientCertificateRejected { .. }) {
            found.kind = AccessKind::ClientCertificateRequired;
        }
        Some(found)
    }
}

/// The rustls configuration of the handshake probe: the CA as the only root, the client
/// certificate if given, HTTP/2 by ALPN (as gRPC).
fn probe_config(
    ca: &[u8],
    identity: Option<&(Vec<u8>, Vec<u8>, std::path::PathBuf)>,
    ca_file: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, EtcdAccessError> {
    let unusable = |what: &'static str, path: &std::path::Path, reason: String| {
        file_error(FileProblem {
            what,
            path: path.to_owned(),
            reason,
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca).flatten() {
        roots.add(cert).map_err(|e| {
            unusable(
                "CA certificate file",
                ca_file,
                format!("not a usable CA certificate: {e}"),
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable("CA certificate file", ca_file, e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key, key_file)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert).flatten().collect();
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
                unusable(
                    "client key file",
                    key_file,
                    format!("no usable PEM private key in it ({e})"),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                unusable(
                    "client key file",
                    key_file,
                    format!("does not fit the client certificate: {e}"),
                )
            })?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The HTTP/2 client preface and an empty SETTINGS frame: a server that accepted the
/// connection answers with its own SETTINGS.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Connects to `url` (`https://host:port`), runs the TLS handshake and sends the HTTP/2
/// preface, and waits for the server's first bytes: a refused handshake or client
/// certificate is an `io::Error` holding the rustls error. A server that says nothing
/// within `timeout` passes (the request that follows will tell).
async fn probe(config: &Arc<rustls::ClientConfig>, url: &str, timeout: Duration) -> std::io::Result<()> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {url}"));
    let authority = url.strip_prefix("https://").unwrap_or(url);
    let authority = authority.split('/').next().unwrap_or(authority);
    let (host, _port) = authority.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
        .map_err(|_| invalid("not a host name or address"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(authority).await?;
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(H2_PREFACE).await?;
        tls.flush().await?;
        let mut byte = [0u8; 1];
        if tls.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection after the TLS handshake",
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// The typed failure in `e` (a TLS handshake failure, a refused user or password, a
/// permission denied), or `None` for failures that may pass (transport errors, no
/// leader, timeouts) and other refusals. Invariant: everything this returns is final:
/// the same request on another member, or later, fails the same way.
pub(crate) fn access_failure(e: &etcd_client::Error, endpoint: &str, user: Option<&str>) -> Option<EtcdAccessError> {
    let kind = match e {
        etcd_client::Error::GRpcStatus(status) => {
            // gRPC status codes (fixed by the gRPC spec) and etcd's messages (rpctypes).
            const INVALID_ARGUMENT: i32 = 3;
            const PERMISSION_DENIED: i32 = 7;
            const FAILED_PRECONDITION: i32 = 9;
            let msg = status.message();
            match i32::from(status.code()) {
                PERMISSION_DENIED => AccessKind::PermissionDenied {
                    user: user.map(str::to_owned),
                    action: String::new(),
                },
                INVALID_ARGUMENT if msg.contains("authentication failed") => AccessKind::WrongPassword {
                    user: user.unwrap_or_default().to_owned(),
                },
                INVALID_ARGUMENT if msg.contains("user name is empty") || msg.contains("user name not found") => {
                    match user {
                        None => AccessKind::AuthRequired,
                        Some(u) => AccessKind::WrongPassword { user: u.to_owned() },
                    }
                }
                FAILED_PRECONDITION if msg.contains("authentication is not enabled") => AccessKind::AuthNotEnabled,
                _ => tls_kind(e)?,
            }
        }
        _ => tls_kind(e)?,
    };
    Some(EtcdAccessError {
        endpoint: endpoint.to_owned(),
        kind,
    })
}

fn tls_kind(e: &etcd_client::Error) -> Option<AccessKind> {
    // etcd-client's error has no `source()`: look into the variants that wrap a cause.
    let problem = match e {
        etcd_client::Error::GRpcStatus(status) => tls_problem(status),
        etcd_client::Error::TransportError(t) => tls_problem(t),
        etcd_client::Error::IoError(io) => tls_problem(io),
        _ => None,
    };
    Some(match problem? {
        TlsProblem::UnknownCa(detail) => AccessKind::UnknownCa { detail },
        TlsProblem::Expired(detail) => AccessKind::CertificateExpired { detail },
        TlsProblem::Mismatch(detail) => AccessKind::CertificateMismatch { detail },
        TlsProblem::ClientCertificateRequired(_) => AccessKind::ClientCertificateRequired,
        TlsProblem::ClientCertificateRejected(detail) => AccessKind::ClientCertificateRejected { detail },
        TlsProblem::Other(detail) => AccessKind::Tls { detail },
    })
}

/// One client per member, connected on first use (so a member that is down when the
/// client is built, or whose authentication round trip fails for now, is tried again
/// later), and the member the next request goes to.
pub(crate) struct Members<T> {
    urls: Vec<String>,
    slots: Vec<tokio::sync::OnceCell<T>>,
    current: AtomicUsize,
    connector: Connector,
    dial: Dial,
    make: fn(Client) -> T,
}

impl<T: Clone> Members<T> {
    /// Members at `urls` (from [`Connector::urls`]); `make` takes what a request needs
    /// out of a connected client.
    pub(crate) fn new(urls: Vec<String>, connector: Connector, dial: Dial, make: fn(Client) -> T) -> Self {
        Members {
            slots: urls.iter().map(|_| tokio::sync::OnceCell::new()).collect(),
            urls,
            current: AtomicUsize::new(0),
            connector,
            dial,
            make,
        }
    }

    /// The member URLs.
    pub(crate) fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The connector (TLS settings and user).
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The index of the member the next request goes to.
    pub(crate) fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.urls.len()
    }

    /// After a failure on member `i`, the next request goes to the next member.
    pub(crate) fn rotate(&self, i: usize) {
        let _ = self
            .current
            .compare_exchange(i, (i + 1) % self.urls.len(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Member `i`'s client, connecting it first if needed.
    pub(crate) async fn client(&self, i: usize) -> Result<T, etcd_client::Error> {
        let slot = &self.slots[i];
        let c = slot
            .get_or_try_init(|| async {
                let client = self.connector.connect(&self.urls[i], &self.dial).await?;
                Ok::<_, etcd_client::Error>((self.make)(client))
            })
            .await?;
        Ok(c.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn endpoint_schemes_follow_the_tls_settings() {
        assert_eq!(
            endpoint_urls(&eps(&["127.0.0.1:2379", "http://h:1"]), false).unwrap(),
            ["http://127.0.0.1:2379", "http://h:1"]
        );
        assert_eq!(
            endpoint_urls(&eps(&["127.0.0.1:2379", "https://h:1"]), true).unwrap(),
            ["https://127.0.0.1:2379", "https://h:1"]
        );
        let e = endpoint_urls(&eps(&["http://h:1"]), true).unwrap_err();
        assert!(e.reason.contains("TLS settings"), "{e:?}");
        let e = endpoint_urls(&eps(&["https://h:1"]), false).unwrap_err();
        assert!(e.reason.contains("CA certificate"), "{e:?}");
        assert!(endpoint_urls(&eps(&["ftp://h:1"]), false).is_err());
        assert!(endpoint_urls(&[], false).is_err());
    }

    #[test]
    fn a_connector_never_shows_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2-very-secret\n").unwrap();
        let security = EtcdSecurity {
            tls: None,
            auth: Some(super::super::EtcdAuth {
                user: "app".into(),
                password_file: pw,
            }),
        };
        let c = Connector::new(&security).unwrap();
        assert_eq!(c.user(), Some("app"));
        let shown = format!("{c:?} {security:?} {:?}", EtcdOptions::default());
        assert!(!shown.contains("hunter2"), "{shown}");
        // A client certificate without its key is refused before any connection.
        let half = EtcdSecurity {
            tls: Some(super::super::EtcdTls {
                ca_cert_file: dir.path().join("ca.pem"),
                cert_file: Some(dir.path().join("c.pem")),
                key_file: None,
            }),
            auth: None,
        };
        let e = Connector::new(&half).unwrap_err();
        assert!(matches!(e.kind, AccessKind::Settings(_)), "{e}");
        let no_ca = EtcdSecurity {
            tls: Some(super::super::EtcdTls {
                cert_file: None,
                ..half.tls.clone().unwrap()
            }),
            auth: None,
        };
        let e = Connector::new(&EtcdSecurity {
            tls: no_ca.tls.map(|t| super::super::EtcdTls { key_file: None, ..t }),
            auth: None,
        })
        .unwrap_err();
        assert!(
            matches!(
                e.kind,
                AccessKind::File {
                    what: "CA certificate file",
                    ..
                }
            ),
            "{e}"
        );
    }
}
