//! Erlang store specs and init options onto the core's types: `memory`,
//! `{memory, Name}`, `{disk, Path}`, `{etcd, Endpoints}` and `{etcd, Endpoints,
//! #{tls, auth}}` become a [`StoreKey`] (the core parses and checks them);
//! the options map becomes [`ShareOptions`] and, for `{hybrid, P, S}`,
//! [`HybridOptions`].

use std::path::PathBuf;

use erlmcp_rollout::etcd::EtcdSecurity;
use erlmcp_rollout::migrate::hybrid::{HybridOptions, PhaseEtcd};
use erlmcp_rollout::session::shared::{ShareOptions, StoreKey};
use erlmcp_rollout::session::uri::StoreUri;
use erlmcp_rollout::session::TouchPolicy;
use rustler::types::map::MapIterator;
use rustler::types::tuple::get_tuple;
use rustler::{Atom, Term};

use super::migration::decode_phase;
use crate::atoms;
use crate::term::{binary_bytes, proper_list, text};

/// The options of `session_open/2` every store uses.
pub struct OpenOptions {
    /// The name of a plain `memory` store.
    pub name: String,
    /// The key prefix of `{etcd, ..}` stores.
    pub prefix: Vec<u8>,
    /// `touch_permille`; `None`: the store kind's default ([`StoreKey::default_touch`]).
    pub touch: Option<TouchPolicy>,
    pub tombstone_retention_ms: Option<u64>,
    /// `tls` and `auth`: for every etcd store and the etcd phase (unless they have their own).
    pub etcd: EtcdSecurity,
}

impl OpenOptions {
    pub fn share(&self, migration: bool) -> ShareOptions {
        ShareOptions {
            touch: self.touch,
            tombstone_retention_ms: self.tombstone_retention_ms,
            migration,
        }
    }
}

pub fn decode_open_options(opts: Term<'_>) -> Result<OpenOptions, String> {
    let mut o = OpenOptions {
        name: "erlmcp_session_native".into(),
        prefix: b"erlmcp/sessions/".to_vec(),
        touch: None,
        tombstone_retention_ms: None,
        etcd: EtcdSecurity::default(),
    };
    o.etcd = crate::etcd::decode_security(opts, &o.etcd)?;
    let iter = MapIterator::new(opts).ok_or("options must be a map")?;
    for (k, v) in iter {
        let Ok(key) = k.decode::<Atom>() else { continue };
        if key == atoms::name() {
            if !v.is_atom() {
                return Err("name must be an atom".into());
            }
            o.name = v.atom_to_string().map_err(|_| "name must be an atom")?;
        } else if key == atoms::prefix() {
            o.prefix = binary_bytes(v)
                .map(<[u8]>::to_vec)
                .or_else(|| text(v).map(String::into_bytes))
                .ok_or("prefix must be a binary or a string")?;
        } else if key == atoms::touch_permille() {
            let p: u16 = v.decode().map_err(|_| "touch_permille must be an integer 0..1000")?;
            o.touch = Some(TouchPolicy::permille(p).map_err(|e| e.to_string())?);
        } else if key == atoms::tombstone_retention_ms() {
            o.tombstone_retention_ms = Some(
                v.decode()
                    .map_err(|_| "tombstone_retention_ms must be a non-negative integer")?,
            );
        }
    }
    Ok(o)
}

/// The store `spec` names, and its kind (`memory`, `disk` or `etcd`).
pub fn decode_spec(spec: Term<'_>, o: &OpenOptions) -> Result<(StoreKey, Atom), String> {
    let key = decode_key(spec, o)?;
    let kind = match key {
        StoreKey::Memory(_) => atoms::memory(),
        StoreKey::Disk(_) => atoms::disk(),
        StoreKey::Etcd { .. } => atoms::etcd(),
    };
    Ok((key, kind))
}

fn decode_key(spec: Term<'_>, o: &OpenOptions) -> Result<StoreKey, String> {
    if spec.decode::<Atom>().ok() == Some(atoms::memory()) {
        return Ok(StoreKey::memory(o.name.clone()));
    }
    if let Some([tag, arg]) = pair(spec) {
        let tag = tag.decode::<Atom>().ok();
        if tag == Some(atoms::memory()) {
            let name = arg
                .is_atom()
                .then(|| arg.atom_to_string().ok())
                .flatten()
                .ok_or("{memory, Name}: Name must be an atom")?;
            return Ok(StoreKey::memory(name));
        }
        if tag == Some(atoms::disk()) {
            let path = text(arg).ok_or("{disk, Path}: Path must be a string or a binary (UTF-8)")?;
            if path.is_empty() {
                return Err("{disk, Path}: Path is empty".into());
            }
            return StoreKey::from_uri(&StoreUri::Disk(PathBuf::from(path)), &o.name, &o.etcd)
                .map_err(|e| e.to_string());
        }
        if tag == Some(atoms::etcd()) {
            return etcd_key(arg, o.etcd.clone(), o);
        }
    }
    // `{etcd, Endpoints, #{tls => .., auth => ..}}`: this store's own TLS and user.
    if let Some([tag, arg, opts]) = triple(spec) {
        if tag.decode::<Atom>().ok() == Some(atoms::etcd()) {
            if !opts.is_map() {
                return Err("{etcd, Endpoints, Options}: Options must be a map (tls, auth)".into());
            }
            return etcd_key(arg, crate::etcd::decode_security(opts, &o.etcd)?, o);
        }
    }
    Err(
        "store must be memory, {memory, Name}, {disk, Path}, {etcd, Endpoints} or {etcd, Endpoints, #{tls, auth}}"
            .into(),
    )
}

fn etcd_key(arg: Term<'_>, security: EtcdSecurity, o: &OpenOptions) -> Result<StoreKey, String> {
    let list =
        proper_list(arg).ok_or("{etcd, Endpoints}: Endpoints must be a list of \"host:port\" strings or binaries")?;
    let mut endpoints = Vec::with_capacity(list.len());
    for e in list {
        endpoints.push(text(e).ok_or("{etcd, Endpoints}: each endpoint must be a string or a binary")?);
    }
    StoreKey::etcd(&endpoints, o.prefix.clone(), security).map_err(|e| format!("{{etcd, Endpoints}}: {e}"))
}

/// The hybrid options of `session_open/2`'s map: `state_dir` (required),
/// `migration_phase`, `shadow_sample`, `phase_etcd`.
pub fn decode_hybrid_options(opts: Term<'_>, o: &OpenOptions) -> Result<HybridOptions, String> {
    let mut state_dir = None;
    let mut h = HybridOptions::new("");
    h.touch = o.touch;
    h.tombstone_retention_ms = o.tombstone_retention_ms;
    if let Some(iter) = MapIterator::new(opts) {
        for (k, v) in iter {
            let Ok(key) = k.decode::<Atom>() else { continue };
            if key == atoms::state_dir() {
                match text(v) {
                    Some(p) if !p.is_empty() => state_dir = Some(PathBuf::from(p)),
                    _ => return Err("state_dir must be a non-empty string or binary".into()),
                }
            } else if key == atoms::migration_phase() {
                h.step_to =
                    Some(decode_phase(v).ok_or("migration_phase must be off, phase1, phase2, phase3 or cleanup")?);
            } else if key == atoms::phase_etcd() {
                h.phase_etcd = Some(decode_phase_etcd(v, &o.etcd)?);
            } else if key == atoms::shadow_sample() {
                h.shadow_sample = Some(
                    v.decode::<u64>()
                        .map_err(|_| "shadow_sample must be a non-negative integer")?,
                );
            }
        }
    }
    h.state_dir = state_dir.ok_or("a hybrid store needs state_dir (its outbox and phase file live there)")?;
    Ok(h)
}

/// `phase_etcd => #{endpoints := [..], node := Name, prefix => P, expect_nodes => [Name],
/// tls => #{..}, auth => #{..}}`; `base`: the `tls` and `auth` of the init options,
/// unless the map has its own.
fn decode_phase_etcd(v: Term<'_>, base: &EtcdSecurity) -> Result<PhaseEtcd, String> {
    let usage = "phase_etcd must be #{endpoints => [\"host:port\"], node => Name, prefix => P, expect_nodes => [Name], tls => #{..}, auth => #{..}}";
    let iter = MapIterator::new(v).ok_or(usage)?;
    let mut p = PhaseEtcd {
        endpoints: Vec::new(),
        prefix: "erlmcp/migration/".into(),
        node: String::new(),
        expect_nodes: Vec::new(),
        security: crate::etcd::decode_security(v, base)?,
    };
    let names = |t: Term<'_>| -> Option<Vec<String>> {
        proper_list(t)?
            .into_iter()
            .map(|e| text(e).or_else(|| e.atom_to_string().ok()))
            .collect()
    };
    for (k, v) in iter {
        match k.atom_to_string().as_deref() {
            Ok("endpoints") => p.endpoints = names(v).ok_or(usage)?,
            Ok("prefix") => p.prefix = text(v).ok_or(usage)?,
            Ok("node") => p.node = text(v).or_else(|| v.atom_to_string().ok()).ok_or(usage)?,
            Ok("expect_nodes") => p.expect_nodes = names(v).ok_or(usage)?,
            _ => {}
        }
    }
    if p.endpoints.is_empty() || p.node.is_empty() {
        return Err(usage.into());
    }
    Ok(p)
}

pub fn pair(term: Term<'_>) -> Option<[Term<'_>; 2]> {
    get_tuple(term).ok()?.try_into().ok()
}

pub fn triple(term: Term<'_>) -> Option<[Term<'_>; 3]> {
    get_tuple(term).ok()?.try_into().ok()
}
