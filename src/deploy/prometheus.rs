//! A small blocking Prometheus HTTP API client and the canary metrics source
//! built on it (DESIGN §6.3).
//!
//! - [`Client::query`] and [`Client::query_range`] call `/api/v1/query` and
//!   `/api/v1/query_range` and parse every result type (vector, matrix,
//!   scalar, string), including the value strings `"NaN"`, `"+Inf"` and
//!   `"-Inf"`.
//! - [`Templates`] are the PromQL queries behind each canary metric, with
//!   `$deployment` and `$window` placeholders; [`collect`] runs them for both
//!   sides at one evaluation time and returns [`CanaryMetrics`] for
//!   [`decide`](super::canary::decide), plus what it ran.
//!
//! `http://` and `https://` URLs; over `https://` with a CA file
//! ([`ClientOptions::ca_cert_file`], else the Mozilla roots), a bearer token or basic
//! auth ([`HttpAuth`]), for Prometheus behind Thanos, Mimir or a reverse proxy.
//! Secrets are read from files and never shown; credentials go only over `https://`.
//!
//! # Pitfalls this module avoids
//! - No `or vector(0)`: an empty result is [`NoData::Empty`], not zero.
//! - A query that returns several series is an error ([`PrometheusError::Ambiguous`]),
//!   not "take the first": aggregate it (`sum`, `max`, `sum by (le)`).
//! - After a target dies, `rate(x[5m])` keeps its old value for minutes, so
//!   each side is also checked for the age of its newest sample and for `up`
//!   ([`Freshness`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::canary::{CanaryMetrics, Freshness, Metric, NoData, Reading, Side};
use crate::tls::{read_certs, read_secret, tls_problem, FileProblem, Secret, TlsProblem};

/// Why a Prometheus request failed. Every variant means "no verdict": callers
/// must not promote.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrometheusError {
    /// The URL is not a usable `http://` URL.
    #[error("invalid Prometheus URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No HTTP response: connection refused, DNS, timeout.
    #[error("cannot reach Prometheus at {url}: {message}")]
    Unreachable {
        /// The request URL (without the query string).
        url: String,
        /// The transport error.
        message: String,
    },
    /// A CA, token or password file cannot be read or holds nothing usable.
    #[error("{what} {}: {reason}", path.display())]
    File {
        /// Which file (`CA certificate file`, `token file`, `password file`).
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why (never the file's content).
        reason: String,
    },
    /// The TLS handshake failed: unknown CA, expired or mismatched certificate, ...
    #[error("TLS to {url} failed: {problem}")]
    Tls {
        /// The request URL.
        url: String,
        /// What failed (`unknown CA: ...`, `certificate expired: ...`).
        problem: String,
    },
    /// HTTP 401 or 403: the credentials are missing or wrong, or not allowed.
    #[error("HTTP {status} from {url}: {credentials} refused (wrong or missing credentials); no verdict")]
    Unauthorized {
        /// HTTP status (401 or 403).
        status: u16,
        /// The request URL.
        url: String,
        /// Which credentials were sent (`no credentials`, `the bearer token from FILE`,
        /// `basic auth as user U`), never the secret.
        credentials: String,
    },
    /// Prometheus rejected or failed the query: 400 `bad_data` (syntax),
    /// 422 `execution`, 503 `timeout`, ...
    #[error("Prometheus answered HTTP {status} ({error_type}): {message}\n  query: {query}")]
    Query {
        /// HTTP status.
        status: u16,
        /// Prometheus' `errorType`.
        error_type: String,
        /// Prometheus' `error`.
        message: String,
        /// The PromQL sent.
        query: String,
    },
    /// An HTTP error that is not a Prometheus API error (e.g. a plain-text
    /// 404 from a wrong URL or a proxy page).
    #[error("HTTP {status} from {url}: {body} (is this the Prometheus base URL?)")]
    Http {
        /// HTTP status.
        status: u16,
        /// The request URL.
        url: String,
        /// The start of the body.
        body: String,
    },
    /// A 200 response that is not a Prometheus API answer.
    #[error("unexpected response from {url}: {message}")]
    Response {
        /// The request URL.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// An instant query returned several series where one was expected.
    #[error("query returned {series} series, expected one; aggregate it (sum, max, sum by (le)):\n  query: {query}")]
    Ambiguous {
        /// How many series.
        series: usize,
        /// The PromQL sent.
        query: String,
    },
    /// An instant query returned a range vector (a bare `x[5m]`).
    #[error("query returned a range vector; wrap it in a function such as rate():\n  query: {query}")]
    RangeVector {
        /// The PromQL sent.
        query: String,
    },
    /// A template or option is invalid.
    #[error("{0}")]
    Config(String),
}

/// One sample of an instant vector.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub at: f64,
    /// The value; may be NaN or ±Inf.
    pub value: f64,
}

/// One series of a range result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Series {
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// `(unix seconds, value)` pairs; values may be NaN or ±Inf.
    pub points: Vec<(f64, f64)>,
}

/// A query result.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", content = "result", rename_all = "snake_case")]
pub enum QueryResult {
    /// An instant vector.
    Vector(Vec<Sample>),
    /// A range vector.
    Matrix(Vec<Series>),
    /// A scalar `(unix seconds, value)`.
    Scalar(f64, f64),
    /// A string `(unix seconds, text)`.
    String(f64, String),
}

impl QueryResult {
    /// Reduce an instant result to one [`Reading`]: no series is
    /// [`NoData::Empty`], one sample or a scalar is classified by
    /// [`Reading::from_f64`].
    ///
    /// # Errors
    /// [`PrometheusError::Ambiguous`] for several series,
    /// [`PrometheusError::RangeVector`] for a matrix, [`PrometheusError::Response`]
    /// for a string.
    pub fn single(&self, query: &str) -> Result<Reading, PrometheusError> {
        match self {
            QueryResult::Vector(v) => match v.as_slice() {
                [] => Ok(Reading::NoData(NoData::Empty)),
                [s] => Ok(Reading::from_f64(s.value)),
                many => Err(PrometheusError::Ambiguous {
                    series: many.len(),
                    query: query.to_owned(),
                }),
            },
            QueryResult::Scalar(_, v) => Ok(Reading::from_f64(*v)),
            QueryResult::Matrix(_) => Err(PrometheusError::RangeVector {
                query: query.to_owned(),
            }),
            QueryResult::String(..) => Err(PrometheusError::Response {
                url: String::new(),
                message: format!("query returned a string, expected a number: {query}"),
            }),
        }
    }
}

/// Parse a Prometheus sample value: a decimal or exponent number, `"NaN"`,
/// `"+Inf"`, `"-Inf"`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::prometheus::parse_value;
/// assert_eq!(parse_value("1e-07"), Some(1e-7));
/// assert_eq!(parse_value("+Inf"), Some(f64::INFINITY));
/// assert!(parse_value("NaN").is_some_and(f64::is_nan));
/// assert_eq!(parse_value("lots"), None);
/// ```
pub fn parse_value(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        t if t.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) && !t.is_empty() => t.parse().ok(),
        _ => None,
    }
}

/// The Prometheus API envelope.
#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct RawSeries {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(f64, String)>,
    #[serde(default)]
    values: Option<Vec<(f64, String)>>,
}

/// Credentials sent with every request, read from files (the secret never appears in
/// an argument, a `Debug` output or an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpAuth {
    /// `Authorization: Bearer TOKEN`, the token being the file's content (one line).
    Bearer {
        /// The file holding the token.
        token_file: PathBuf,
    },
    /// HTTP basic auth.
    Basic {
        /// The user name.
        user: String,
        /// The file holding the password (one line).
        password_file: PathBuf,
    },
}

/// How a [`Client`] connects: timeout, TLS trust and credentials. Kept on the client
/// ([`Client::options`]) so every component that queries the same Prometheus (canary
/// decisions, the rollout controller) connects the same way.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::prometheus::{ClientOptions, HttpAuth};
/// let opts = ClientOptions {
///     ca_cert_file: Some("/etc/erlmcp/prometheus-ca.pem".into()),
///     auth: Some(HttpAuth::Basic { user: "canary".into(), password_file: "/etc/erlmcp/prom-password".into() }),
///     ..ClientOptions::default()
/// };
/// assert_eq!(opts.timeout, erlmcp_rollout::deploy::prometheus::DEFAULT_HTTP_TIMEOUT);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Timeout of each whole request (default [`DEFAULT_HTTP_TIMEOUT`]).
    pub timeout: Duration,
    /// PEM file of the CA(s) that signed the server's certificate (`https://` only);
    /// `None`: the Mozilla roots.
    pub ca_cert_file: Option<PathBuf>,
    /// Credentials (`https://` only); `None`: none sent.
    pub auth: Option<HttpAuth>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: DEFAULT_HTTP_TIMEOUT,
            ca_cert_file: None,
            auth: None,
        }
    }
}

/// A blocking client for one Prometheus server.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::prometheus::{Client, ClientOptions, HttpAuth, PrometheusError};
/// // Nothing listens on port 1: the error says so, it is never a verdict.
/// let client = Client::new("http://127.0.0.1:1")?;
/// let err = client.query("up", None).unwrap_err();
/// assert!(matches!(err, PrometheusError::Unreachable { .. }));
/// // Credentials go over https:// only.
/// let opts = ClientOptions {
///     auth: Some(HttpAuth::Bearer { token_file: "token".into() }),
///     ..ClientOptions::default()
/// };
/// assert!(matches!(Client::with_options("http://127.0.0.1:9090", opts), Err(PrometheusError::BadUrl { .. })));
/// # Ok::<(), PrometheusError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    query_timeout: Option<String>,
    options: ClientOptions,
    /// The `Authorization` header value (redacted in `Debug`).
    authorization: Option<Secret>,
}

fn file_error(p: FileProblem) -> PrometheusError {
    PrometheusError::File {
        what: p.what,
        path: p.path,
        reason: p.reason,
    }
}

/// Base64 (RFC 4648, with padding) for the basic-auth header.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The default HTTP timeout of a whole request.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// A client for the Prometheus at `url` (`http://host:port` or `https://host:port`,
    /// optionally with a path prefix), with [`DEFAULT_HTTP_TIMEOUT`], no credentials and
    /// (for `https://`) the Mozilla roots.
    ///
    /// # Errors
    /// [`PrometheusError::BadUrl`] unless the URL starts with `http://` or `https://`
    /// and names a host.
    pub fn new(url: &str) -> Result<Client, PrometheusError> {
        Client::with_timeout(url, DEFAULT_HTTP_TIMEOUT)
    }

    /// As [`Client::new`] with an HTTP timeout for each whole request.
    ///
    /// # Errors
    /// As [`Client::new`].
    pub fn with_timeout(url: &str, timeout: Duration) -> Result<Client, PrometheusError> {
        Client::with_options(
            url,
            ClientOptions {
                timeout,
                ..ClientOptions::default()
            },
        )
    }

    /// A client with a CA file and credentials ([`ClientOptions`]); the files are read
    /// now.
    ///
    /// # Errors
    /// [`PrometheusError::BadUrl`] for a URL that is not `http(s)://HOST...`, or a CA
    /// file or credentials with an `http://` URL (they would travel in clear);
    /// [`PrometheusError::File`] for a CA, token or password file that cannot be read or
    /// holds nothing usable.
    ///
    /// # Examples
    /// ```no_run
    /// use erlmcp_rollout::deploy::prometheus::{Client, ClientOptions, HttpAuth};
    /// let client = Client::with_options("https://prometheus.internal:9090", ClientOptions {
    ///     ca_cert_file: Some("ca.pem".into()),
    ///     auth: Some(HttpAuth::Bearer { token_file: "token".into() }),
    ///     ..ClientOptions::default()
    /// })?;
    /// let up = client.query("up", None)?;
    /// # Ok::<(), erlmcp_rollout::deploy::PrometheusError>(())
    /// ```
    pub fn with_options(url: &str, options: ClientOptions) -> Result<Client, PrometheusError> {
        let bad = |reason: &str| PrometheusError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (rest, https) = if let Some(rest) = url.strip_prefix("http://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (rest, true)
        } else {
            return Err(bad("expected http://HOST:PORT or https://HOST:PORT"));
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(bad("no host"));
        }
        if rest.contains(['?', '#']) {
            return Err(bad("give the base URL, without a query or fragment"));
        }
        if rest.contains('@') {
            return Err(bad("no credentials in the URL: give a token or password file"));
        }
        if !https && options.auth.is_some() {
            return Err(bad(
                "credentials are sent over https:// only (over http:// they would travel in clear)",
            ));
        }
        if !https && options.ca_cert_file.is_some() {
            return Err(bad("a CA certificate file applies to https:// URLs"));
        }
        let authorization = match &options.auth {
            None => None,
            Some(HttpAuth::Bearer { token_file }) => {
                let token = read_secret("token file", token_file).map_err(file_error)?;
                Some(Secret::from(format!("Bearer {}", token.expose())))
            }
            Some(HttpAuth::Basic { user, password_file }) => {
                if user.is_empty() || user.contains(':') {
                    return Err(PrometheusError::Config(
                        "the basic-auth user must be non-empty and contain no ':'".into(),
                    ));
                }
                let password = read_secret("password file", password_file).map_err(file_error)?;
                Some(Secret::from(format!(
                    "Basic {}",
                    base64(format!("{user}:{}", password.expose()).as_bytes())
                )))
            }
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &options.ca_cert_file {
            let pem = read_certs("CA certificate file", ca).map_err(file_error)?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
                    certs.push(c);
                }
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(options.timeout))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Client {
            base: url.trim_end_matches('/').to_owned(),
            agent,
            query_timeout: None,
            options,
            authorization,
        })
    }

    /// The options the client was built with (to build another client the same way).
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Ask Prometheus to abort each query after `timeout` (its `timeout`
    /// parameter, a Prometheus duration such as `10s`); it then answers 503.
    pub fn query_timeout(mut self, timeout: Option<String>) -> Client {
        self.query_timeout = timeout;
        self
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Run an instant query at `at` (unix seconds; `None`: the server's now).
    ///
    /// # Errors
    /// [`PrometheusError::Unreachable`], [`PrometheusError::Query`] (400, 422,
    /// 503), [`PrometheusError::Http`], [`PrometheusError::Response`].
    pub fn query(&self, promql: &str, at: Option<f64>) -> Result<QueryResult, PrometheusError> {
        let mut params = vec![("query", promql.to_owned())];
        if let Some(t) = at {
            params.push(("time", format_ts(t)));
        }
        self.get("/api/v1/query", promql, params)
    }

    /// Run a range query from `start` to `end` (unix seconds) every `step`
    /// seconds.
    ///
    /// # Errors
    /// As [`Client::query`].
    pub fn query_range(&self, promql: &str, start: f64, end: f64, step: f64) -> Result<QueryResult, PrometheusError> {
        let params = vec![
            ("query", promql.to_owned()),
            ("start", format_ts(start)),
            ("end", format_ts(end)),
            ("step", format_ts(step)),
        ];
        self.get("/api/v1/query_range", promql, params)
    }

    fn get(&self, path: &str, promql: &str, mut params: Vec<(&str, String)>) -> Result<QueryResult, PrometheusError> {
        let url = format!("{}{path}", self.base);
        if let Some(t) = &self.query_timeout {
            params.push(("timeout", t.clone()));
        }
        let mut req = self.agent.get(&url);
        for (k, v) in &params {
            req = req.query(*k, v);
        }
        if let Some(auth) = &self.authorization {
            req = req.header("Authorization", auth.expose());
        }
        let unreachable = |e: ureq::Error| match tls_problem(&e) {
            Some(p) => PrometheusError::Tls {
                url: url.clone(),
                problem: match p {
                    TlsProblem::UnknownCa(d) => {
                        format!("unknown CA: the server's certificate is not signed by the CA in the CA file ({d})")
                    }
                    TlsProblem::Expired(d) => format!("the server's certificate has expired or is not valid yet ({d})"),
                    TlsProblem::Mismatch(d) => {
                        format!("mismatched certificate: not valid for this host name or address ({d})")
                    }
                    TlsProblem::ClientCertificateRequired(d)
                    | TlsProblem::ClientCertificateRejected(d)
                    | TlsProblem::Other(d) => d,
                },
            },
            None => PrometheusError::Unreachable {
                url: url.clone(),
                message: e.to_string(),
            },
        };
        let mut resp = req.call().map_err(unreachable)?;
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(PrometheusError::Unauthorized {
                status,
                url,
                credentials: match &self.options.auth {
                    None => "no credentials".into(),
                    Some(HttpAuth::Bearer { token_file }) => {
                        format!("the bearer token from {}", token_file.display())
                    }
                    Some(HttpAuth::Basic { user, .. }) => format!("basic auth as user {user:?}"),
                },
            });
        }
        let body = resp.body_mut().read_to_string().map_err(unreachable)?;
        parse_response(&url, promql, status, &body)
    }
}

fn format_ts(t: f64) -> String {
    // Prometheus takes fractional unix seconds; keep millisecond precision.
    format!("{:.3}", t)
}

fn parse_response(url: &str, promql: &str, status: u16, body: &str) -> Result<QueryResult, PrometheusError> {
    let envelope: Option<Envelope> = serde_json::from_str(body).ok();
    let Some(env) = envelope else {
        let snippet: String = body.trim().chars().take(200).collect();
        return Err(if status == 200 {
            PrometheusError::Response {
                url: url.to_owned(),
                message: format!("not a Prometheus API answer: {snippet:?}"),
            }
        } else {
            PrometheusError::Http {
                status,
                url: url.to_owned(),
                body: snippet,
            }
        });
    };
    if env.status != "success" || status != 200 {
        return Err(PrometheusError::Query {
            status,
            error_type: env.error_type.unwrap_or_else(|| "unknown".into()),
            message: env.error.unwrap_or_else(|| format!("status {:?}", env.status)),
            query: promql.to_owned(),
        });
    }
    let bad = |message: String| PrometheusError::Response {
        url: url.to_owned(),
        message,
    };
    let data = env.data.ok_or_else(|| bad("success without data".into()))?;
    let value = |text: &str| parse_value(text).ok_or_else(|| bad(format!("bad sample value {text:?}")));
    match data.result_type.as_str() {
        "vector" | "matrix" => {
            let raw: Vec<RawSeries> =
                serde_json::from_value(data.result).map_err(|e| bad(format!("bad {}: {e}", data.result_type)))?;
            if data.result_type == "vector" {
                let mut out = Vec::with_capacity(raw.len());
                for s in raw {
                    let (at, v) = s.value.ok_or_else(|| bad("vector sample without value".into()))?;
                    out.push(Sample {
                        labels: s.metric,
                        at,
                        value: value(&v)?,
                    });
                }
                Ok(QueryResult::Vector(out))
            } else {
                let mut out = Vec::with_capacity(raw.len());
                for s in raw {
                    let mut points = Vec::new();
                    for (at, v) in s.values.unwrap_or_default() {
                        points.push((at, value(&v)?));
                    }
                    out.push(Series {
                        labels: s.metric,
                        points,
                    });
                }
                Ok(QueryResult::Matrix(out))
            }
        }
        "scalar" | "string" => {
            let (at, v): (f64, String) =
                serde_json::from_value(data.result).map_err(|e| bad(format!("bad {}: {e}", data.result_type)))?;
            if data.result_type == "scalar" {
                Ok(QueryResult::Scalar(at, value(&v)?))
            } else {
                Ok(QueryResult::String(at, v))
            }
        }
        other => Err(bad(format!("unknown resultType {other:?}"))),
    }
}

/// The PromQL behind each canary metric. `$deployment` becomes the side's
/// label value (`canary` or `stable`) and `$window` the window (`5m`).
/// `up` and `last_sample` are the freshness checks; an empty string disables
/// a check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Templates {
    /// Requests served in the window.
    pub requests: String,
    /// Failed / total requests (NaN without requests, which is no data).
    pub error_rate: String,
    /// p95 latency in milliseconds.
    pub latency_p95_ms: String,
    /// p99 latency in milliseconds.
    pub latency_p99_ms: String,
    /// CPU usage as a fraction of the limit (worst pod).
    pub cpu: String,
    /// Memory usage as a fraction of the limit (worst pod).
    pub memory: String,
    /// Container restarts in the window.
    pub restarts: String,
    /// 0 when any target is down (`min(up)`).
    pub up: String,
    /// Unix time of the newest sample.
    pub last_sample: String,
}

impl Default for Templates {
    fn default() -> Self {
        let sel = r#"{deployment="$deployment"}"#;
        let quantile = |q: &str| {
            format!(
                "1000 * histogram_quantile({q}, sum by (le) (rate(erlmcp_request_duration_seconds_bucket{sel}[$window])))"
            )
        };
        let usage = |usage: &str, resource: &str| {
            format!(
                "max(sum by (pod) ({usage}) / sum by (pod) (kube_pod_container_resource_limits{{resource=\"{resource}\", deployment=\"$deployment\"}}))"
            )
        };
        Templates {
            requests: format!("sum(increase(erlmcp_requests_total{sel}[$window]))"),
            error_rate: format!(
                "sum(rate(erlmcp_requests_failed_total{sel}[$window])) / sum(rate(erlmcp_requests_total{sel}[$window]))"
            ),
            latency_p95_ms: quantile("0.95"),
            latency_p99_ms: quantile("0.99"),
            cpu: usage(&format!("rate(container_cpu_usage_seconds_total{sel}[$window])"), "cpu"),
            memory: usage(&format!("container_memory_working_set_bytes{sel}"), "memory"),
            restarts: format!("sum(increase(kube_pod_container_status_restarts_total{sel}[$window]))"),
            up: format!("min(up{sel})"),
            last_sample: format!("max(timestamp(erlmcp_requests_total{sel}))"),
        }
    }
}

/// The template names accepted by [`Templates::set`].
pub const TEMPLATE_NAMES: [&str; 9] = [
    "requests",
    "error_rate",
    "latency_p95_ms",
    "latency_p99_ms",
    "cpu",
    "memory",
    "restarts",
    "up",
    "last_sample",
];

impl Templates {
    /// Replace one template by name (see [`TEMPLATE_NAMES`]).
    ///
    /// # Errors
    /// [`PrometheusError::Config`] for an unknown name, or an empty template
    /// for a metric (only `up` and `last_sample` may be disabled).
    pub fn set(&mut self, name: &str, promql: &str) -> Result<(), PrometheusError> {
        let slot = match name {
            "requests" => &mut self.requests,
            "error_rate" => &mut self.error_rate,
            "latency_p95_ms" => &mut self.latency_p95_ms,
            "latency_p99_ms" => &mut self.latency_p99_ms,
            "cpu" => &mut self.cpu,
            "memory" => &mut self.memory,
            "restarts" => &mut self.restarts,
            "up" => &mut self.up,
            "last_sample" => &mut self.last_sample,
            _ => {
                return Err(PrometheusError::Config(format!(
                    "unknown query {name:?}; known: {}",
                    TEMPLATE_NAMES.join(", ")
                )))
            }
        };
        if promql.trim().is_empty() && !matches!(name, "up" | "last_sample") {
            return Err(PrometheusError::Config(format!(
                "the {name} query cannot be empty (only up and last_sample can be disabled)"
            )));
        }
        *slot = promql.to_owned();
        Ok(())
    }

    /// The template of a metric.
    pub fn metric(&self, m: Metric) -> &str {
        match m {
            Metric::Requests => &self.requests,
            Metric::ErrorRate => &self.error_rate,
            Metric::LatencyP95Ms => &self.latency_p95_ms,
            Metric::LatencyP99Ms => &self.latency_p99_ms,
            Metric::Cpu => &self.cpu,
            Metric::Memory => &self.memory,
            Metric::Restarts => &self.restarts,
        }
    }
}

/// Where and how to read canary metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Source {
    /// The queries.
    pub templates: Templates,
    /// Label value of the canary (`$deployment`), default `canary`.
    pub canary: String,
    /// Label value of stable, default `stable`.
    pub stable: String,
    /// The range for rates (`$window`), a Prometheus duration; default `5m`.
    pub window: String,
    /// A side whose newest sample is older than this is stale (default 120 s).
    pub max_sample_age_seconds: f64,
}

impl Default for Source {
    fn default() -> Self {
        Source {
            templates: Templates::default(),
            canary: "canary".into(),
            stable: "stable".into(),
            window: "5m".into(),
            max_sample_age_seconds: 120.0,
        }
    }
}

/// Whether `text` is a Prometheus duration such as `5m`, `1h30m`, `90s`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::prometheus::is_duration;
/// assert!(is_duration("5m") && is_duration("1h30m") && is_duration("250ms"));
/// assert!(!is_duration("5") && !is_duration("5 m") && !is_duration("m"));
/// ```
pub fn is_duration(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

impl Source {
    /// The label value of a side.
    pub fn label(&self, side: Side) -> &str {
        match side {
            Side::Canary => &self.canary,
            Side::Stable => &self.stable,
        }
    }

    /// A template with `$deployment` and `$window` filled in.
    pub fn render(&self, template: &str, side: Side) -> String {
        template
            .replace("$deployment", &escape_label(self.label(side)))
            .replace("$window", &self.window)
    }

    fn validate(&self) -> Result<(), PrometheusError> {
        if !is_duration(&self.window) {
            return Err(PrometheusError::Config(format!(
                "window {:?} is not a Prometheus duration (e.g. 5m, 1h)",
                self.window
            )));
        }
        if !(self.max_sample_age_seconds.is_finite() && self.max_sample_age_seconds > 0.0) {
            return Err(PrometheusError::Config(
                "the maximum sample age must be a positive number of seconds".into(),
            ));
        }
        Ok(())
    }
}

/// Escape a label value for a double-quoted PromQL string.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// One query [`collect`] ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueryRecord {
    /// The side.
    pub side: Side,
    /// The template name.
    pub name: &'static str,
    /// The PromQL sent.
    pub query: String,
    /// Its reading.
    pub result: Reading,
}

/// What [`collect`] read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Collected {
    /// The evaluation time (unix seconds).
    pub at: f64,
    /// The metrics, with freshness filled in.
    pub metrics: CanaryMetrics,
    /// Every query and its reading.
    pub queries: Vec<QueryRecord>,
}

/// Run every template for both sides at one evaluation time `at` (unix
/// seconds; `None`: now) and build [`CanaryMetrics`].
///
/// A side is [`Freshness::Stale`] when its newest sample (`last_sample`) is
/// older than `max_sample_age_seconds` at `at`, [`Freshness::TargetDown`] when
/// `up` is 0, [`Freshness::Unknown`] when either check returns no data.
///
/// # Errors
/// The first [`PrometheusError`]; nothing is decided on partial data.
///
/// # Examples
/// ```no_run
/// use erlmcp_rollout::deploy::canary::{decide, Thresholds};
/// use erlmcp_rollout::deploy::prometheus::{collect, Client, Source};
/// let client = Client::new("http://127.0.0.1:9090")?;
/// let collected = collect(&client, &Source::default(), None)?;
/// let verdict = decide(&collected.metrics, &Thresholds::default());
/// println!("{}", verdict.render());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn collect(client: &Client, source: &Source, at: Option<f64>) -> Result<Collected, PrometheusError> {
    source.validate()?;
    let at = match at {
        Some(t) => t,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .map_err(|e| PrometheusError::Config(format!("system clock before 1970: {e}")))?,
    };
    let mut metrics = CanaryMetrics::default();
    let mut queries = Vec::new();
    let mut run = |side: Side, name: &'static str, template: &str| -> Result<Reading, PrometheusError> {
        let query = source.render(template, side);
        let result = client.query(&query, Some(at))?.single(&query)?;
        queries.push(QueryRecord {
            side,
            name,
            query,
            result,
        });
        Ok(result)
    };
    for side in Side::BOTH {
        for m in Metric::ALL {
            let r = run(side, m.as_str(), source.templates.metric(m))?;
            metrics.side_mut(side).set(m, r);
        }
        let mut freshness = Freshness::Unchecked;
        if !source.templates.last_sample.trim().is_empty() {
            freshness = match run(side, "last_sample", &source.templates.last_sample)? {
                Reading::Value(ts) => {
                    let age_seconds = ((at - ts) * 1000.0).round() / 1000.0;
                    if age_seconds > source.max_sample_age_seconds {
                        Freshness::Stale {
                            age_seconds,
                            max_age_seconds: source.max_sample_age_seconds,
                        }
                    } else {
                        Freshness::Fresh { age_seconds }
                    }
                }
                Reading::NoData(reason) => Freshness::Unknown {
                    reason,
                    check: "last_sample",
                },
            };
        }
        if !source.templates.up.trim().is_empty() && !matches!(freshness, Freshness::Stale { .. }) {
            match run(side, "up", &source.templates.up)? {
                Reading::Value(v) if v < 1.0 => freshness = Freshness::TargetDown,
                Reading::Value(_) => {}
                Reading::NoData(reason) => {
                    if !matches!(freshness, Freshness::Unknown { .. }) {
                        freshness = Freshness::Unknown { reason, check: "up" };
                    }
                }
            }
        }
        metrics.side_mut(side).freshness = freshness;
    }
    Ok(Collected { at, metrics, queries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_rfc4648_base64() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b""), "");
        // The secret stays out of the client's Debug output.
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret-value\n").unwrap();
        let c = Client::with_options(
            "https://127.0.0.1:1",
            ClientOptions {
                auth: Some(HttpAuth::Basic {
                    user: "u".into(),
                    password_file: pw,
                }),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains(&base64(b"u:s3cret-value")),
            "{shown}"
        );
    }

    #[test]
    fn parses_every_result_type() {
        let q = |body: &str| parse_response("u", "q", 200, body);
        let v = q(r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"b"},"value":[1.5,"NaN"]}]}}"#)
            .unwrap();
        let QueryResult::Vector(s) = &v else { panic!("{v:?}") };
        assert!(s[0].value.is_nan());
        assert_eq!(v.single("q").unwrap(), Reading::NoData(NoData::Nan));
        let m = q(r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"],[2,"+Inf"]]}]}}"#)
            .unwrap();
        assert!(matches!(m.single("q"), Err(PrometheusError::RangeVector { .. })));
        let s = q(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"-Inf"]}}"#).unwrap();
        assert_eq!(s.single("q").unwrap(), Reading::NoData(NoData::NegInf));
        let e = q(r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"1"]},{"metric":{"x":"y"},"value":[1,"2"]}]}}"#)
            .unwrap();
        assert!(matches!(
            e.single("q"),
            Err(PrometheusError::Ambiguous { series: 2, .. })
        ));
        assert!(matches!(q("<html>"), Err(PrometheusError::Response { .. })));
        assert!(matches!(
            parse_response("u", "q", 404, "404 page not found\n"),
            Err(PrometheusError::Http { status: 404, .. })
        ));
        assert!(matches!(
            parse_response(
                "u",
                "q",
                503,
                r#"{"status":"error","errorType":"timeout","error":"query timed out"}"#
            ),
            Err(PrometheusError::Query { status: 503, .. })
        ));
    }

    #[test]
    fn renders_templates() {
        let s = Source {
            canary: r#"ca"n"#.into(),
            ..Source::default()
        };
        assert_eq!(
            s.render(&s.templates.requests, Side::Canary),
            r#"sum(increase(erlmcp_requests_total{deployment="ca\"n"}[5m]))"#
        );
    }
}
