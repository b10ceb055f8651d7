//! How commands reach etcd and Prometheus: TLS trust, client certificates and
//! credentials, shared by every command that talks to them. Secrets are only ever named
//! by file (a value on the command line would show in `ps`).

use std::path::PathBuf;

use clap::Args;
use erlmcp_rollout::deploy::prometheus::{ClientOptions, HttpAuth, DEFAULT_HTTP_TIMEOUT};
use erlmcp_rollout::etcd::{EtcdAuth, EtcdSecurity, EtcdTls};

/// TLS and authentication for etcd (every command that talks to etcd, `etcd:` store URIs
/// included). With `--etcd-cacert`, `host:port` endpoints are `https://`.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "etcd connection (or ERLMCP_ETCD_* environment variables)")]
pub struct EtcdAccessArgs {
    /// PEM file of the CA that signed the etcd members' certificates (TLS: https://).
    #[arg(long, value_name = "FILE", env = "ERLMCP_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// PEM client certificate, for clusters with --client-cert-auth (needs --etcd-key).
    #[arg(long, value_name = "FILE", env = "ERLMCP_ETCD_CERT", requires_all = ["etcd_key", "etcd_cacert"])]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, value_name = "FILE", env = "ERLMCP_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd authentication; needs --etcd-password-file).
    #[arg(long, value_name = "NAME", env = "ERLMCP_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (one line).
    #[arg(long, value_name = "FILE", env = "ERLMCP_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdAccessArgs {
    /// The library's settings for these options.
    pub fn security(&self) -> EtcdSecurity {
        EtcdSecurity {
            tls: self.etcd_cacert.as_ref().map(|ca| EtcdTls {
                ca_cert_file: ca.clone(),
                cert_file: self.etcd_cert.clone(),
                key_file: self.etcd_key.clone(),
            }),
            auth: match (&self.etcd_user, &self.etcd_password_file) {
                (Some(user), Some(file)) => Some(EtcdAuth {
                    user: user.clone(),
                    password_file: file.clone(),
                }),
                _ => None,
            },
        }
    }
}

/// TLS trust and credentials for an `https://` Prometheus (Thanos, Mimir, a reverse proxy).
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Prometheus connection")]
pub struct PrometheusAccessArgs {
    /// PEM file of the CA that signed the Prometheus server's certificate (https:// only;
    /// default: the Mozilla roots).
    #[arg(long, value_name = "FILE")]
    pub prometheus_cacert: Option<PathBuf>,
    /// File holding a bearer token sent as "Authorization: Bearer" (https:// only).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prometheus_user", "prometheus_password_file"])]
    pub prometheus_token_file: Option<PathBuf>,
    /// Basic-auth user (https:// only; needs --prometheus-password-file).
    #[arg(long, value_name = "NAME", requires = "prometheus_password_file")]
    pub prometheus_user: Option<String>,
    /// File holding the basic-auth password (one line).
    #[arg(long, value_name = "FILE", requires = "prometheus_user")]
    pub prometheus_password_file: Option<PathBuf>,
}

impl PrometheusAccessArgs {
    /// Whether any of these options was given.
    pub fn any(&self) -> bool {
        self.prometheus_cacert.is_some() || self.prometheus_token_file.is_some() || self.prometheus_user.is_some()
    }

    /// The library's client options for these options and an HTTP timeout.
    pub fn client_options(&self, timeout: Option<std::time::Duration>) -> ClientOptions {
        let auth = match (
            &self.prometheus_token_file,
            &self.prometheus_user,
            &self.prometheus_password_file,
        ) {
            (Some(token_file), _, _) => Some(HttpAuth::Bearer {
                token_file: token_file.clone(),
            }),
            (None, Some(user), Some(password_file)) => Some(HttpAuth::Basic {
                user: user.clone(),
                password_file: password_file.clone(),
            }),
            _ => None,
        };
        ClientOptions {
            timeout: timeout.unwrap_or(DEFAULT_HTTP_TIMEOUT),
            ca_cert_file: self.prometheus_cacert.clone(),
            auth,
        }
    }
}
