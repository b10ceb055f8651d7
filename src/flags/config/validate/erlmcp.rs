//! erlmcp's own flag file (`{"flags": [{"name": ..., "state": ...}, ...]}`,
//! what its `erlmcp_feature_flags` reads from `FEATURE_FLAGS_PATH`), detected
//! by shape and validated as strictly as ours, into the same model.
//!
//! Invariant: a flag read here evaluates as erlmcp's module evidently intends
//! (`state`, then `rollout_strategy`, with `phash2(Id) rem 100 <
//! rollout_percentage` for a partial rollout: [`Bucketing::Erlmcp`]), and
//! its own fields are kept verbatim under `metadata.erlmcp` so that
//! `get_flag`, `list_flags` and `export_flags` return what the file says.

use super::*;
use crate::flags::erlmcp::{ErlmcpState, Strategy, METADATA_KEY};

/// The one shape our format cannot have: a top-level `"flags"` whose value
/// is a list (a flag of ours is an object).
pub(super) fn is_erlmcp_shape(root: &Node) -> bool {
    root.kind_members().is_some_and(|ms| {
        ms.iter()
            .any(|m| m.key == "flags" && matches!(m.value.kind, Kind::Array(_)))
    })
}

const FIELDS: &str =
    "name, category, state, value, rollout_percentage, rollout_strategy, conditions, description, updated_at";

impl Validator {
    pub(super) fn erlmcp_config(&mut self, root: &Node) -> FlagsConfig {
        let mut flags = BTreeMap::new();
        let Some(members) = self.object(&JPath::Root, root, "an object") else {
            return FlagsConfig { flags };
        };
        let mut items: &[Node] = &[];
        for m in &members {
            let p = JPath::Key(&JPath::Root, &m.key);
            match m.key.as_str() {
                "flags" => {
                    if let Kind::Array(list) = &m.value.kind {
                        items = list;
                    }
                }
                // Written next to the flags by erlmcp's export_flags/0.
                "version" | "environment" => {
                    self.string(&p, &m.value);
                }
                "last_updated" => {
                    self.integer(&p, &m.value);
                }
                other => self.problem(
                    &p,
                    m.key_pos,
                    format!(
                        "unknown top-level field {other:?} in an erlmcp flag file (recognised by its \"flags\" \
                         list); it has flags, version, environment, last_updated"
                    ),
                ),
            }
        }
        let list = JPath::Key(&JPath::Root, "flags");
        let mut first: BTreeMap<String, Pos> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let path = JPath::Index(&list, i);
            let (named, spec) = self.erlmcp_flag(&path, item);
            let Some((name, pos)) = named else {
                self.flag = None;
                continue;
            };
            if let Some(at) = first.get(&name) {
                let at = *at;
                self.problem(
                    &JPath::Key(&path, "name"),
                    pos,
                    format!("flag {name:?} is listed twice (first at {at})"),
                );
            } else {
                first.insert(name.clone(), pos);
                if let Some(spec) = spec {
                    flags.insert(name, spec);
                }
            }
            self.flag = None;
        }
        FlagsConfig { flags }
    }

    /// One element of `"flags"`: its name and where it is (when it has one,
    /// also for an invalid flag: duplicates are found among all), and the
    /// flag when it is valid.
    fn erlmcp_flag(&mut self, path: &JPath<'_>, node: &Node) -> (Option<(String, Pos)>, Option<FlagSpec>) {
        let Some(members) = self.object(path, node, "a flag object {\"name\": ..., ...}") else {
            return (None, None);
        };
        let before = self.problems.len();
        let mut name = None;
        match members.iter().find(|m| m.key == "name") {
            None => self.problem(path, node.pos, "flag is missing \"name\""),
            Some(m) => {
                let p = JPath::Key(path, "name");
                if let Some(n) = self.string(&p, &m.value) {
                    self.flag = Some(n.clone());
                    self.flag_name(&p, m.value.pos, &n);
                    name = Some((n, m.value.pos));
                }
            }
        }
        let mut kept = serde_json::Map::new();
        let mut state = ErlmcpState::Enabled;
        let mut strategy = Strategy::All;
        let mut percentage = Percentage::FULL;
        let mut value_false = false;
        for m in &members {
            let p = JPath::Key(path, &m.key);
            let v = &m.value;
            let ok = match m.key.as_str() {
                "name" => false,
                "category" | "description" => self.string(&p, v).is_some(),
                "state" => match &v.kind {
                    Kind::String(s) => match ErlmcpState::from_name(s) {
                        Some(st) => {
                            state = st;
                            true
                        }
                        None => {
                            self.problem(
                                &p,
                                v.pos,
                                format!("state must be enabled, disabled or rollout, got {s:?}"),
                            );
                            false
                        }
                    },
                    _ => {
                        self.wrong_type(&p, v, "\"enabled\", \"disabled\" or \"rollout\"");
                        false
                    }
                },
                "rollout_strategy" => {
                    match &v.kind {
                        Kind::String(s) => match Strategy::from_name(s) {
                            Some(st) => {
                                strategy = st;
                                true
                            }
                            None => {
                                self.problem(
                                &p,
                                v.pos,
                                format!("rollout_strategy must be all, none, canary, percentage or user_segment, got {s:?}"),
                            );
                                false
                            }
                        },
                        _ => {
                            self.wrong_type(&p, v, "a rollout strategy (a string)");
                            false
                        }
                    }
                }
                "value" => match &v.kind {
                    Kind::Null | Kind::Array(_) => {
                        self.wrong_type(&p, v, "a boolean, number, string or object (erlmcp's flag values)");
                        false
                    }
                    kind => {
                        value_false = matches!(kind, Kind::Bool(false));
                        true
                    }
                },
                "rollout_percentage" => match self.percentage(&p, v) {
                    Some(pc) => {
                        percentage = pc;
                        true
                    }
                    None => false,
                },
                "conditions" => self.object(&p, v, "an object").is_some(),
                "updated_at" => self.integer(&p, v).is_some(),
                other => {
                    self.problem(
                        &p,
                        m.key_pos,
                        format!("unknown field {other:?}; an erlmcp flag has {FIELDS}"),
                    );
                    false
                }
            };
            if ok {
                kept.insert(m.key.clone(), to_json_value(v));
            }
        }
        if self.problems.len() != before || name.is_none() {
            return (name, None);
        }
        let spec = FlagSpec {
            enabled: state.is_on(strategy) && !value_false,
            rollout_percentage: if state.is_partial(strategy) {
                percentage
            } else {
                Percentage::FULL
            },
            metadata: [(METADATA_KEY.to_owned(), serde_json::Value::Object(kept))]
                .into_iter()
                .collect(),
            bucketing: Bucketing::Erlmcp,
            ..FlagSpec::default()
        };
        (name, Some(spec))
    }

    fn integer(&mut self, path: &JPath<'_>, node: &Node) -> Option<i64> {
        match &node.kind {
            Kind::Number(t) => match t.parse::<i64>() {
                Ok(i) => Some(i),
                Err(_) => {
                    self.problem(path, node.pos, format!("must be an integer, got {t}"));
                    None
                }
            },
            _ => {
                self.wrong_type(path, node, "an integer");
                None
            }
        }
    }
}
