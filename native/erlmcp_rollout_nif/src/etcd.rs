//! etcd connection options from Erlang terms, and access errors back to terms
//! (conversion only; the connection is built by the core's `etcd` module):
//! `tls => #{cacertfile => File, certfile => File, keyfile => File}` (the `ssl`
//! application's names) and `auth => #{user => Name, password_file => File}`.

use erlmcp_rollout::etcd::{AccessKind, EtcdAccessError, EtcdAuth, EtcdSecurity, EtcdTls};
use rustler::{Encoder, Env, Term};

use crate::term::text;

mod atoms {
    rustler::atoms! {
        etcd_access,
        file,
        settings,
        unknown_ca,
        certificate_expired,
        certificate_mismatch,
        client_certificate_required,
        client_certificate_rejected,
        tls,
        wrong_password,
        auth_required,
        auth_not_enabled,
        permission_denied,
        other,
    }
}

const TLS_USAGE: &str =
    "tls must be #{cacertfile => File, certfile => File, keyfile => File} (certfile and keyfile optional, together)";
const AUTH_USAGE: &str = "auth must be #{user => Name, password_file => File}";

/// `#{Key => Value}` pairs with atom keys, or `usage` as the error.
fn fields<'a>(v: Term<'a>, usage: &str) -> Result<Vec<(String, Term<'a>)>, String> {
    let iter = rustler::types::map::MapIterator::new(v).ok_or(usage)?;
    iter.map(|(k, v)| k.atom_to_string().map(|k| (k, v)).map_err(|_| usage.to_owned()))
        .collect()
}

/// Decodes `tls => #{...}`.
pub fn decode_tls(v: Term<'_>) -> Result<EtcdTls, String> {
    let mut ca = None;
    let mut tls = EtcdTls {
        ca_cert_file: Default::default(),
        cert_file: None,
        key_file: None,
    };
    for (k, v) in fields(v, TLS_USAGE)? {
        let path = text(v)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("tls: {k} must be a file name (string or binary)"))?;
        match k.as_str() {
            "cacertfile" => ca = Some(path.into()),
            "certfile" => tls.cert_file = Some(path.into()),
            "keyfile" => tls.key_file = Some(path.into()),
            other => return Err(format!("tls: unknown key {other}; {TLS_USAGE}")),
        }
    }
    tls.ca_cert_file = ca.ok_or_else(|| format!("tls: cacertfile is required; {TLS_USAGE}"))?;
    Ok(tls)
}

/// Decodes `auth => #{...}`.
pub fn decode_auth(v: Term<'_>) -> Result<EtcdAuth, String> {
    let (mut user, mut file) = (None, None);
    for (k, v) in fields(v, AUTH_USAGE)? {
        match k.as_str() {
            "user" => user = Some(text(v).ok_or("auth: user must be a string or binary")?),
            "password_file" => file = Some(text(v).ok_or("auth: password_file must be a file name")?),
            other => return Err(format!("auth: unknown key {other}; {AUTH_USAGE}")),
        }
    }
    match (user, file) {
        (Some(user), Some(file)) => Ok(EtcdAuth {
            user,
            password_file: file.into(),
        }),
        _ => Err(AUTH_USAGE.into()),
    }
}

/// Applies the `tls` and `auth` keys of an options map (other keys ignored) on top of `base`.
pub fn decode_security(opts: Term<'_>, base: &EtcdSecurity) -> Result<EtcdSecurity, String> {
    let mut s = base.clone();
    if let Some(iter) = rustler::types::map::MapIterator::new(opts) {
        for (k, v) in iter {
            match k.atom_to_string().as_deref() {
                Ok("tls") => s.tls = Some(decode_tls(v)?),
                Ok("auth") => s.auth = Some(decode_auth(v)?),
                _ => {}
            }
        }
    }
    Ok(s)
}

/// `{etcd_access, Kind, Message}` with Kind one of `file`, `settings`, `unknown_ca`,
/// `certificate_expired`, `certificate_mismatch`, `client_certificate_required`,
/// `client_certificate_rejected`, `tls`, `wrong_password`, `auth_required`,
/// `auth_not_enabled`, `permission_denied`.
pub fn access_error_term<'a>(env: Env<'a>, e: &EtcdAccessError) -> Term<'a> {
    let kind = match &e.kind {
        AccessKind::File { .. } => atoms::file(),
        AccessKind::Settings(_) => atoms::settings(),
        AccessKind::UnknownCa { .. } => atoms::unknown_ca(),
        AccessKind::CertificateExpired { .. } => atoms::certificate_expired(),
        AccessKind::CertificateMismatch { .. } => atoms::certificate_mismatch(),
        AccessKind::ClientCertificateRequired => atoms::client_certificate_required(),
        AccessKind::ClientCertificateRejected { .. } => atoms::client_certificate_rejected(),
        AccessKind::Tls { .. } => atoms::tls(),
        AccessKind::WrongPassword { .. } => atoms::wrong_password(),
        AccessKind::AuthRequired => atoms::auth_required(),
        AccessKind::AuthNotEnabled => atoms::auth_not_enabled(),
        AccessKind::PermissionDenied { .. } => atoms::permission_denied(),
        _ => atoms::other(),
    };
    (atoms::etcd_access(), kind, e.to_string()).encode(env)
}
