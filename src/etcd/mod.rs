//! How the crate connects to etcd: the one place every etcd client (the session store
//! [`EtcdStore`](crate::session::EtcdStore), flag push and watch, the migration phase
//! store) builds its connections.
//!
//! - Endpoints are `host:port`, `http://host:port` or `https://host:port`. With
//!   [`EtcdSecurity::tls`] set, `host:port` means `https://`; an `http://` endpoint with
//!   TLS options, or an `https://` endpoint without a CA, is refused.
//! - TLS ([`EtcdTls`]): the CA that signed the members' certificates (etcd's
//!   `--trusted-ca-file`), and for mutual TLS (`--client-cert-auth`) a client
//!   certificate and its key. PEM files, checked when the client is built.
//! - Authentication ([`EtcdAuth`]): an etcd user and the file holding its password, so
//!   etcd's role-based access to key prefixes applies. The password is read from the
//!   file and never appears in a `Debug` output, an error or a log line.
//! - Failures that retrying cannot fix are typed ([`EtcdAccessError`], kind
//!   [`AccessKind`]): unknown CA, expired or mismatched certificate, missing or rejected
//!   client certificate, wrong password, permission denied on a key. Every client
//!   returns them at once instead of retrying until its timeout.
//!
//! # Examples
//! ```
//! use erlmcp_rollout::etcd::{EtcdAuth, EtcdSecurity, EtcdTls};
//! let security = EtcdSecurity {
//!     tls: Some(EtcdTls {
//!         ca_cert_file: "/etc/erlmcp/etcd-ca.pem".into(),
//!         cert_file: Some("/etc/erlmcp/etcd-client.pem".into()),
//!         key_file: Some("/etc/erlmcp/etcd-client-key.pem".into()),
//!     }),
//!     auth: Some(EtcdAuth {
//!         user: "erlmcp".into(),
//!         password_file: "/etc/erlmcp/etcd-password".into(),
//!     }),
//! };
//! // Paths and the user name only: no secret is ever held here.
//! assert!(format!("{security:?}").contains("etcd-password"));
//! ```

use std::fmt;
use std::path::PathBuf;

#[cfg(feature = "etcd")]
mod connect;
#[cfg(feature = "etcd")]
pub(crate) use connect::{run_on, Connector, Dial, Members, REJECTED_GRPC_CODES};
#[cfg(feature = "etcd")]
pub use connect::{EtcdOptions, DEFAULT_ETCD_MAX_REQUEST_BYTES};
#[cfg(feature = "etcd")]
mod oneshot;
#[cfg(feature = "etcd")]
pub(crate) use oneshot::{with_member, OneShotError};

/// TLS to the etcd members (the `ssl` application's `cacertfile`, `certfile`, `keyfile`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EtcdTls {
    /// PEM file with the CA certificate(s) that signed the members' server certificates.
    pub ca_cert_file: PathBuf,
    /// PEM client certificate, for clusters started with `--client-cert-auth` (mutual TLS).
    /// Given together with [`EtcdTls::key_file`].
    pub cert_file: Option<PathBuf>,
    /// PEM private key of [`EtcdTls::cert_file`].
    pub key_file: Option<PathBuf>,
}

/// An etcd user (`etcdctl user add`), with the password in a file: the whole file
/// without one trailing line break.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EtcdAuth {
    /// The user name.
    pub user: String,
    /// The file holding the password (never the password itself).
    pub password_file: PathBuf,
}

/// TLS and authentication of an etcd connection; the default is neither (plain
/// `http://`, no user), which is how etcd runs out of the box.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EtcdSecurity {
    /// TLS settings; `None` for plain `http://`.
    pub tls: Option<EtcdTls>,
    /// The etcd user; `None` when the cluster has authentication off (or the client
    /// certificate's common name is the user, etcd's `--client-cert-auth` alternative).
    pub auth: Option<EtcdAuth>,
}

impl EtcdSecurity {
    /// Whether endpoints are `https://`.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// A failure that retrying cannot fix: the connection was refused because of its TLS
/// settings or credentials, or the user may not touch a key. Nothing was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct EtcdAccessError {
    /// The member that refused (empty when no connection was tried, e.g. an unreadable file).
    pub endpoint: String,
    /// What failed.
    pub kind: AccessKind,
}

impl fmt::Display for EtcdAccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.endpoint.is_empty() {
            write!(f, "etcd: {}", self.kind)
        } else {
            write!(f, "etcd at {}: {}", self.endpoint, self.kind)
        }
    }
}

/// What an [`EtcdAccessError`] is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessKind {
    /// A CA, certificate, key or password file cannot be read or holds no usable PEM.
    #[error("{what} {}: {reason}", path.display())]
    File {
        /// Which file (`CA certificate file`, `client certificate file`, ...).
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why (never the file's content).
        reason: String,
    },
    /// The TLS settings are incomplete (a client certificate without its key, ...).
    #[error("TLS settings: {0}")]
    Settings(String),
    /// The server's certificate is not signed by a CA of the CA file.
    #[error("unknown CA: the server's certificate is not signed by the CA in the CA file ({detail})")]
    UnknownCa {
        /// The TLS library's words.
        detail: String,
    },
    /// The server's certificate has expired (or is not valid yet).
    #[error("the server's certificate has expired or is not valid yet ({detail})")]
    CertificateExpired {
        /// The TLS library's words.
        detail: String,
    },
    /// The server's certificate does not name the host or address connected to.
    #[error("mismatched certificate: the server's certificate is not valid for this host name or address ({detail})")]
    CertificateMismatch {
        /// The TLS library's words.
        detail: String,
    },
    /// The cluster requires a client certificate (`--client-cert-auth`) and none was given.
    #[error("the server requires a client certificate and none was given (set the client certificate and key)")]
    ClientCertificateRequired,
    /// The server refused the client certificate (expired, or signed by a CA it does not trust).
    #[error("the server rejected the client certificate: expired, or not signed by a CA it trusts ({detail})")]
    ClientCertificateRejected {
        /// The TLS library's words.
        detail: String,
    },
    /// Another TLS failure (e.g. an `https://` endpoint that speaks plain text).
    #[error("TLS handshake failed ({detail})")]
    Tls {
        /// The TLS library's words.
        detail: String,
    },
    /// etcd refused the user name and password.
    #[error("authentication failed for user {user:?}: wrong user name or password")]
    WrongPassword {
        /// The user.
        user: String,
    },
    /// The cluster has authentication on and no user was given.
    #[error("the cluster requires authentication: give an etcd user and its password file")]
    AuthRequired,
    /// A user was given but the cluster has authentication off.
    #[error("a user was given but the cluster has authentication off (drop the user, or run `etcdctl auth enable`)")]
    AuthNotEnabled,
    /// The user's roles do not grant the request on its key or prefix.
    #[error("permission denied{} for {action}: the user's roles do not grant it", user.as_ref().map(|u| format!(" to user {u:?}")).unwrap_or_default())]
    PermissionDenied {
        /// The user, when one was given.
        user: Option<String>,
        /// What was tried, with the key or prefix (`writing key erlmcp/sessions/s1`).
        action: String,
    },
}

impl EtcdAccessError {
    /// Names what was being done, for [`AccessKind::PermissionDenied`] (others unchanged).
    #[cfg(feature = "etcd")]
    pub(crate) fn doing(mut self, what: &str) -> Self {
        if let AccessKind::PermissionDenied { action, .. } = &mut self.kind {
            if action.is_empty() {
                *action = what.to_owned();
            }
        }
        self
    }
}
