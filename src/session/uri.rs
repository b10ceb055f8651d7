//! Store URIs: one string names a session store and where it lives, for the CLI, the
//! migrator and configuration files.
//!
//! | URI | store |
//! |---|---|
//! | `memory:` (or `memory`) | a fresh [`MemoryStore`] (nothing persists; tests and benches) |
//! | `disk:PATH` | a `DiskStore` in the redb file `PATH` (feature `disk`; created if absent) |
//! | `etcd:HOST:PORT[,HOST:PORT...][/PREFIX]` | an `EtcdStore` (feature `etcd`), keys under `PREFIX/` ([`etcd_prefix`]) |
//!
//! Hosts are names or IPv4 addresses (`A-Z a-z 0-9 . - _`) or bracketed IPv6 addresses
//! (`[::1]:2379`); ports are 1..=65535. Parsing is pure: [`StoreUri::parse`] checks the
//! text and nothing else, and every error names what is wrong and the column where it is.
//! [`StoreUri`]'s `Display` writes the canonical form, which parses back to the same value.
//!
//! # Examples
//! ```
//! use erlmcp_rollout::session::uri::StoreUri;
//! let uri = StoreUri::parse("etcd:10.0.0.1:2379,10.0.0.2:2379/erlmcp/sessions")?;
//! match &uri {
//!     StoreUri::Etcd { endpoints, prefix } => {
//!         assert_eq!(endpoints.len(), 2);
//!         assert_eq!(endpoints[1].url(), "http://10.0.0.2:2379");
//!         assert_eq!(prefix.as_deref(), Some("erlmcp/sessions"));
//!     }
//!     other => panic!("{other}"),
//! }
//! assert_eq!(StoreUri::parse(&uri.to_string())?, uri);
//! let err = StoreUri::parse("etcd:host:99999").unwrap_err();
//! assert_eq!(err.column, 11);
//! assert!(err.to_string().contains("port 99999 is outside 1..=65535"), "{err}");
//! # Ok::<(), erlmcp_rollout::session::uri::UriError>(())
//! ```

use std::fmt;
use std::path::PathBuf;

use super::{MemoryStore, Store, StoreError, StoreOptions};
use crate::etcd::EtcdSecurity;

/// Where a session store lives; see the [module documentation](self) for the syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUri {
    /// `memory:` — a new, empty in-memory store.
    Memory,
    /// `disk:PATH` — a redb file.
    Disk(PathBuf),
    /// `etcd:HOST:PORT,...[/PREFIX]` — an etcd cluster.
    Etcd {
        /// At least one member.
        endpoints: Vec<Endpoint>,
        /// The key prefix (without the leading `/`); `None` for the backend's default.
        prefix: Option<String>,
    },
}

/// One etcd member: `HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// A host name, an IPv4 address, or an IPv6 address in brackets (`[::1]`).
    pub host: String,
    /// The client port.
    pub port: u16,
}

impl Endpoint {
    /// Parses one `HOST:PORT` member in the grammar of `etcd:` URIs.
    ///
    /// # Errors
    /// [`UriError`] naming the problem and its column in `text`.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::uri::Endpoint;
    /// assert_eq!(Endpoint::parse("[::1]:2379")?, Endpoint { host: "[::1]".into(), port: 2379 });
    /// assert!(Endpoint::parse("h:0").unwrap_err().problem.contains("outside 1..=65535"));
    /// # Ok::<(), erlmcp_rollout::session::uri::UriError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Endpoint, UriError> {
        let fail = |at_byte: usize, problem: String| UriError {
            input: text.to_owned(),
            column: text.get(..at_byte).map_or(at_byte, |p| p.chars().count()) + 1,
            problem,
        };
        parse_endpoint(text, 0, &fail)
    }

    /// The plain-text client URL, `http://HOST:PORT` (with TLS settings, stores opened
    /// by [`StoreUri::open_with`] use `https://HOST:PORT`).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::uri::Endpoint;
    /// let e = Endpoint { host: "[::1]".into(), port: 2379 };
    /// assert_eq!(e.url(), "http://[::1]:2379");
    /// ```
    pub fn url(&self) -> String {
        format!("http://{self}")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A store URI that does not parse: what is wrong and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("store URI {input:?}, column {column}: {problem}")]
pub struct UriError {
    /// The text given.
    pub input: String,
    /// 1-based column (in characters) where the problem is.
    pub column: usize,
    /// What is wrong.
    pub problem: String,
}

/// The schemes [`StoreUri::parse`] knows, for error messages.
const SCHEMES: &str = "memory:, disk:PATH, etcd:HOST:PORT[,HOST:PORT...][/PREFIX]";

impl StoreUri {
    /// Parses a store URI.
    ///
    /// # Errors
    /// [`UriError`] naming the problem and its column: an unknown scheme, an empty path,
    /// no endpoints, an empty or malformed host, a missing, non-numeric or out-of-range
    /// port, an empty prefix, text after `memory:`.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::uri::StoreUri;
    /// assert_eq!(StoreUri::parse("memory:")?, StoreUri::Memory);
    /// assert_eq!(StoreUri::parse("disk:/var/lib/s.redb")?, StoreUri::Disk("/var/lib/s.redb".into()));
    /// assert!(StoreUri::parse("redis:localhost").is_err());
    /// # Ok::<(), erlmcp_rollout::session::uri::UriError>(())
    /// ```
    pub fn parse(input: &str) -> Result<Self, UriError> {
        let fail = |at_byte: usize, problem: String| UriError {
            input: input.to_owned(),
            column: input.get(..at_byte).map_or(at_byte, |p| p.chars().count()) + 1,
            problem,
        };
        if input.is_empty() {
            return Err(fail(0, format!("empty; expected one of {SCHEMES}")));
        }
        if input == "memory" {
            return Ok(StoreUri::Memory);
        }
        let Some((scheme, rest)) = input.split_once(':') else {
            return Err(fail(
                0,
                format!("no scheme (text before ':'); expected one of {SCHEMES}"),
            ));
        };
        let base = scheme.len() + 1;
        match scheme {
            "memory" => {
                if rest.is_empty() {
                    Ok(StoreUri::Memory)
                } else {
                    Err(fail(base, "memory: takes nothing after the colon".into()))
                }
            }
            "disk" => {
                if rest.is_empty() {
                    Err(fail(base, "disk: needs a file path (disk:PATH)".into()))
                } else {
                    Ok(StoreUri::Disk(PathBuf::from(rest)))
                }
            }
            "etcd" => parse_etcd(rest, base, &fail),
            other => Err(fail(0, format!("unknown scheme {other:?}; expected one of {SCHEMES}"))),
        }
    }

    /// Opens (creating if needed) the store this URI names.
    ///
    /// # Errors
    /// What the backend's constructor returns ([`StoreError::Unavailable`] when a file
    /// cannot be opened, [`StoreError::Corrupt`]); [`InvalidInput::NotBuiltIn`](super::InvalidInput::NotBuiltIn) for a
    /// backend this build does not include (`disk` or `etcd` without its feature). An
    /// `etcd:` store is connected with `EtcdOptions::default()` and fails with
    /// [`StoreError::Unavailable`] when no member answers within its connect timeout.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{uri::StoreUri, StoreOptions};
    /// let store = StoreUri::Memory.open(StoreOptions::default())?;
    /// assert!(store.scan(None, 1, erlmcp_rollout::session::Visibility::Raw)?.records.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(&self, options: StoreOptions) -> Result<Box<dyn Store>, StoreError> {
        self.open_with(options, &EtcdSecurity::default())
    }

    /// [`StoreUri::open`] with TLS and/or an etcd user for an `etcd:` store (ignored by
    /// the other backends): with TLS the endpoints are `https://`. See [`crate::etcd`].
    ///
    /// # Errors
    /// As [`StoreUri::open`], and [`StoreError::Access`] for an unreadable CA, certificate,
    /// key or password file, a refused TLS handshake or password, or no permission on the
    /// prefix.
    ///
    /// # Examples
    /// ```no_run
    /// use erlmcp_rollout::etcd::{EtcdAuth, EtcdSecurity, EtcdTls};
    /// use erlmcp_rollout::session::{uri::StoreUri, StoreOptions};
    /// let security = EtcdSecurity {
    ///     tls: Some(EtcdTls { ca_cert_file: "ca.pem".into(), cert_file: None, key_file: None }),
    ///     auth: Some(EtcdAuth { user: "erlmcp".into(), password_file: "password".into() }),
    /// };
    /// let store = StoreUri::parse("etcd:10.0.0.1:2379/erlmcp/sessions")?.open_with(StoreOptions::default(), &security)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_with(&self, options: StoreOptions, etcd: &EtcdSecurity) -> Result<Box<dyn Store>, StoreError> {
        #[cfg(not(feature = "etcd"))]
        let _ = etcd;
        match self {
            StoreUri::Memory => Ok(Box::new(MemoryStore::new(options))),
            #[cfg(feature = "disk")]
            StoreUri::Disk(path) => Ok(Box::new(super::DiskStore::create(path, options)?)),
            #[cfg(not(feature = "disk"))]
            StoreUri::Disk(_) => Err(super::InvalidInput::NotBuiltIn {
                backend: "disk".into(),
                hint: " (cargo feature `disk`)".into(),
            }
            .into()),
            #[cfg(feature = "etcd")]
            StoreUri::Etcd { endpoints, prefix } => {
                // host:port: the scheme follows the TLS settings.
                let members: Vec<String> = endpoints.iter().map(Endpoint::to_string).collect();
                let prefix = etcd_prefix(prefix.as_deref());
                Ok(Box::new(super::EtcdStore::connect(
                    &members,
                    prefix,
                    super::EtcdOptions {
                        security: etcd.clone(),
                        ..super::EtcdOptions::default()
                    },
                    options,
                )?))
            }
            #[cfg(not(feature = "etcd"))]
            StoreUri::Etcd { .. } => Err(super::InvalidInput::NotBuiltIn {
                backend: "etcd".into(),
                hint: " (cargo feature `etcd`)".into(),
            }
            .into()),
        }
    }
}

/// The key prefix an `etcd:` URI stores under: [`DEFAULT_ETCD_PREFIX`] when none is
/// given, otherwise the given prefix ending in `/` (added when missing, so that
/// `etcd:h:1/a` and `etcd:h:1/ab` never share keys).
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::uri::{etcd_prefix, DEFAULT_ETCD_PREFIX};
/// assert_eq!(etcd_prefix(None), DEFAULT_ETCD_PREFIX);
/// assert_eq!(etcd_prefix(Some("erlmcp/sessions")), "erlmcp/sessions/");
/// assert_eq!(etcd_prefix(Some("s/")), "s/");
/// ```
pub fn etcd_prefix(prefix: Option<&str>) -> String {
    match prefix {
        None => DEFAULT_ETCD_PREFIX.to_owned(),
        Some(p) if p.ends_with('/') => p.to_owned(),
        Some(p) => format!("{p}/"),
    }
}

/// Where an `etcd:` URI without a `/PREFIX` keeps its sessions.
pub const DEFAULT_ETCD_PREFIX: &str = "erlmcp/sessions/";

fn parse_etcd(rest: &str, base: usize, fail: &dyn Fn(usize, String) -> UriError) -> Result<StoreUri, UriError> {
    let (members, prefix) = match rest.find('/') {
        Some(slash) => {
            let prefix = &rest[slash + 1..];
            if prefix.is_empty() {
                return Err(fail(
                    base + slash + 1,
                    "empty key prefix after '/' (drop the '/' for the default)".into(),
                ));
            }
            (&rest[..slash], Some(prefix.to_owned()))
        }
        None => (rest, None),
    };
    if members.is_empty() {
        return Err(fail(base, "etcd: needs at least one HOST:PORT endpoint".into()));
    }
    let mut endpoints = Vec::new();
    let mut at = base;
    for member in members.split(',') {
        endpoints.push(parse_endpoint(member, at, fail)?);
        at += member.len() + 1;
    }
    Ok(StoreUri::Etcd { endpoints, prefix })
}

fn parse_endpoint(text: &str, at: usize, fail: &dyn Fn(usize, String) -> UriError) -> Result<Endpoint, UriError> {
    if text.is_empty() {
        return Err(fail(at, "empty endpoint (expected HOST:PORT)".into()));
    }
    let host_len = if text.starts_with('[') {
        let close = text
            .find(']')
            .ok_or_else(|| fail(at, format!("IPv6 address {text:?} has no closing ']'")))?;
        let inner = &text[1..close];
        if inner.is_empty() {
            return Err(fail(at, "empty IPv6 address in brackets".into()));
        }
        if let Some((i, c)) = inner
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_hexdigit() || *c == ':' || *c == '.'))
        {
            return Err(fail(at + 1 + i, format!("character {c:?} in an IPv6 address")));
        }
        close + 1
    } else {
        let colon = text.rfind(':').ok_or_else(|| {
            fail(
                at + text.len(),
                format!("endpoint {text:?} has no port (expected HOST:PORT)"),
            )
        })?;
        let host = &text[..colon];
        if host.is_empty() {
            return Err(fail(at, "empty host (expected HOST:PORT)".into()));
        }
        if let Some((i, c)) = host
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(fail(at + i, format!("character {c:?} in host {host:?}")));
        }
        colon
    };
    let host = &text[..host_len];
    let after = &text[host_len..];
    let Some(port) = after.strip_prefix(':') else {
        return Err(fail(
            at + host_len,
            format!("endpoint {text:?} has no port (expected HOST:PORT)"),
        ));
    };
    let port_at = at + host_len + 1;
    if port.is_empty() {
        return Err(fail(port_at, format!("endpoint {text:?} has an empty port")));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(fail(port_at, format!("port {port:?} is not a number")));
    }
    match port.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(Endpoint {
            host: host.to_owned(),
            port: p as u16,
        }),
        _ => Err(fail(port_at, format!("port {port} is outside 1..=65535"))),
    }
}

/// The canonical form: `memory:`, `disk:PATH`, `etcd:H:P,H:P/PREFIX`.
impl fmt::Display for StoreUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUri::Memory => f.write_str("memory:"),
            StoreUri::Disk(path) => write!(f, "disk:{}", path.display()),
            StoreUri::Etcd { endpoints, prefix } => {
                f.write_str("etcd:")?;
                for (i, e) in endpoints.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{e}")?;
                }
                if let Some(p) = prefix {
                    write!(f, "/{p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::str::FromStr for StoreUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StoreUri::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> UriError {
        StoreUri::parse(s).unwrap_err()
    }

    #[test]
    fn parses_each_scheme() {
        assert_eq!(StoreUri::parse("memory").unwrap(), StoreUri::Memory);
        assert_eq!(StoreUri::parse("disk:a:b").unwrap(), StoreUri::Disk("a:b".into()));
        assert_eq!(
            StoreUri::parse("etcd:[::1]:2379,h-2.local:1").unwrap(),
            StoreUri::Etcd {
                endpoints: vec![
                    Endpoint {
                        host: "[::1]".into(),
                        port: 2379
                    },
                    Endpoint {
                        host: "h-2.local".into(),
                        port: 1
                    }
                ],
                prefix: None
            }
        );
    }

    #[test]
    fn errors_name_the_problem_and_column() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "empty"),
            ("sessions.redb", 1, "no scheme"),
            ("redis:x", 1, "unknown scheme \"redis\""),
            ("memory:x", 8, "nothing after"),
            ("disk:", 6, "needs a file path"),
            ("etcd:", 6, "at least one"),
            ("etcd:/p", 6, "at least one"),
            ("etcd:h:1/", 10, "empty key prefix"),
            ("etcd:h:1,,h:2", 10, "empty endpoint"),
            ("etcd:h:1,host", 14, "no port"),
            ("etcd::2379", 6, "empty host"),
            ("etcd:h o:1", 7, "character ' '"),
            ("etcd:h:", 8, "empty port"),
            ("etcd:h:12a", 8, "not a number"),
            ("etcd:h:0", 8, "outside 1..=65535"),
            ("etcd:[::1:2379", 6, "no closing"),
            ("etcd:[::1]2379", 11, "no port"),
            ("etcd:[::g]:1", 9, "character 'g'"),
            ("etcd:é:x", 6, "character 'é'"),
            ("etcd:h:١", 8, "not a number"),
        ];
        for (input, column, needle) in cases {
            let e = err(input);
            assert_eq!(e.column, *column, "{input}: {e}");
            assert!(e.to_string().contains(needle), "{input}: {e}");
            assert_eq!(&e.input, input);
        }
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn etcd_is_not_built_in_without_the_feature() {
        let e = StoreUri::parse("etcd:h:1")
            .unwrap()
            .open(StoreOptions::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("etcd store not built in"), "{e}");
    }
}
