//! The strict loader: JSON (with positions) to the model, every problem
//! reported at once; also the week-plan reader that reuses its stage rules.

use std::collections::BTreeMap;

use super::error::{ConfigError, Problem};
use super::model::*;
use super::{FlagsConfig, MAX_FLAG_NAME_CHARS};
use crate::json::{self, Kind, Member, Node, Pos};
use crate::time_text::{format_time, parse_time};
use time::OffsetDateTime;

mod erlmcp;

/// A JSONPath built on the stack while validating; rendered to text only
/// when a problem is reported.
#[derive(Clone, Copy)]
enum JPath<'a> {
    Root,
    Key(&'a JPath<'a>, &'a str),
    Index(&'a JPath<'a>, usize),
}

impl JPath<'_> {
    fn render(&self) -> String {
        match self {
            JPath::Root => "$".to_owned(),
            JPath::Key(base, key) => {
                let base = base.render();
                let simple = !key.is_empty()
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    && !key.starts_with(|c: char| c.is_ascii_digit());
                if simple {
                    format!("{base}.{key}")
                } else {
                    format!("{base}[{}]", serde_json::Value::String((*key).to_owned()))
                }
            }
            JPath::Index(base, i) => format!("{}[{i}]", base.render()),
        }
    }
}

#[derive(Default)]
pub(super) struct Validator {
    pub(super) problems: Vec<Problem>,
    flag: Option<String>,
    /// Every well-formed prerequisite (flag, index, position, it), also of
    /// flags with other problems, for the checks across flags.
    prereqs: Vec<(String, usize, Pos, Prerequisite)>,
}

impl Validator {
    fn problem(&mut self, path: &JPath<'_>, pos: Pos, message: impl Into<String>) {
        self.problems.push(Problem {
            flag: self.flag.clone(),
            path: path.render(),
            line: Some(pos.line),
            column: Some(pos.column),
            message: message.into(),
        });
    }

    fn wrong_type(&mut self, path: &JPath<'_>, node: &Node, expected: &str) {
        let got = node.kind.type_name();
        self.problem(path, node.pos, format!("expected {expected}, got {got}"));
    }

    /// Members of an object, reporting duplicates; `None` if not an object.
    fn object<'n>(&mut self, path: &JPath<'_>, node: &'n Node, what: &str) -> Option<Vec<&'n Member>> {
        let Kind::Object(members) = &node.kind else {
            self.wrong_type(path, node, what);
            return None;
        };
        let mut seen: BTreeMap<&str, Pos> = BTreeMap::new();
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            if let Some(first) = seen.get(m.key.as_str()) {
                let first = *first;
                self.problem(
                    &JPath::Key(path, &m.key),
                    m.key_pos,
                    format!("duplicate key {:?} (first at {first})", m.key),
                );
                if matches!(path, JPath::Root) {
                    // A duplicate flag name: the problem belongs to that flag.
                    if let Some(p) = self.problems.last_mut() {
                        p.flag = Some(m.key.clone());
                    }
                }
                continue;
            }
            seen.insert(&m.key, m.key_pos);
            out.push(m);
        }
        Some(out)
    }

    /// A flag name's rules (both formats).
    fn flag_name(&mut self, path: &JPath<'_>, pos: Pos, name: &str) {
        let chars = name.chars().count();
        if chars == 0 {
            self.problem(path, pos, "flag name is empty");
        } else if chars > MAX_FLAG_NAME_CHARS {
            self.problem(
                path,
                pos,
                format!("flag name has {chars} characters; at most {MAX_FLAG_NAME_CHARS} (an Erlang atom's limit)"),
            );
        } else if name.chars().any(char::is_control) {
            self.problem(path, pos, "flag name contains control characters");
        }
    }

    pub(super) fn config(&mut self, root: &Node) -> FlagsConfig {
        if erlmcp::is_erlmcp_shape(root) {
            return self.erlmcp_config(root);
        }
        let mut flags = BTreeMap::new();
        let Some(members) = self.object(&JPath::Root, root, "an object mapping flag names to flags") else {
            return FlagsConfig { flags };
        };
        for m in &members {
            let path = JPath::Key(&JPath::Root, &m.key);
            self.flag = Some(m.key.clone());
            self.flag_name(&path, m.key_pos, &m.key);
            if let Some(spec) = self.flag_spec(&path, &m.value) {
                flags.insert(m.key.clone(), spec);
            }
            self.flag = None;
        }
        let names: Vec<&str> = members.iter().map(|m| m.key.as_str()).collect();
        self.check_prerequisites(&names, &flags);
        FlagsConfig { flags }
    }

    fn flag_spec(&mut self, path: &JPath<'_>, node: &Node) -> Option<FlagSpec> {
        let members = self.object(path, node, "an object (the flag)")?;
        let mut spec = FlagSpec::default();
        let before = self.problems.len();
        for m in &members {
            let p = JPath::Key(path, &m.key);
            let v = &m.value;
            match m.key.as_str() {
                "enabled" => spec.enabled = self.boolean(&p, v).unwrap_or(false),
                "rollout_percentage" => spec.rollout_percentage = self.percentage(&p, v).unwrap_or(Percentage::FULL),
                "environments" => spec.environments = self.environments(&p, v),
                "conditions" => spec.conditions = self.conditions(&p, v),
                "metadata" => spec.metadata = self.metadata(&p, v),
                "stickiness" => {
                    if let Some(s) = self.non_empty_string(&p, v) {
                        spec.stickiness = s;
                    }
                }
                "salt" => spec.salt = self.string(&p, v),
                "schedule" => spec.schedule = self.schedule(&p, v),
                "rollout_basis_points" => spec.rollout_basis_points = self.basis_points(&p, v),
                "variants" => spec.variants = self.variants(&p, v),
                "prerequisites" => spec.prerequisites = self.prerequisites(&p, v),
                "bucketing" => match &v.kind {
                    Kind::String(s) if s == "v1" => spec.bucketing = Bucketing::V1,
                    Kind::String(s) if s == "erlmcp" => spec.bucketing = Bucketing::Erlmcp,
                    _ => self.problem(&p, v.pos, "bucketing must be \"v1\" or \"erlmcp\""),
                },
                other => self.problem(
                    &p,
                    m.key_pos,
                    format!(
                        "unknown field {other:?}; a flag has enabled, rollout_percentage, rollout_basis_points, \
                         environments, conditions, metadata, stickiness, salt, schedule, variants, prerequisites, \
                         bucketing"
                    ),
                ),
            }
        }
        if spec.bucketing == Bucketing::Erlmcp {
            // erlmcp's contract has one formula: phash2(Value) rem 100.
            for field in ["salt", "rollout_basis_points", "variants"] {
                if let Some(m) = members.iter().find(|m| m.key == field) {
                    self.problem(
                        &JPath::Key(path, &m.key),
                        m.key_pos,
                        format!("{field} cannot be used with \"bucketing\": \"erlmcp\" (phash2(Value) rem 100)"),
                    );
                }
            }
            if let Some(stages) = &spec.schedule {
                if stages.stages().iter().any(|s| s.rollout_basis_points.is_some()) {
                    let m = members.iter().find(|m| m.key == "schedule");
                    let pos = m.map_or(node.pos, |m| m.key_pos);
                    self.problem(
                        &JPath::Key(path, "schedule"),
                        pos,
                        "schedule stages cannot set rollout_basis_points with \"bucketing\": \"erlmcp\"",
                    );
                }
            }
        }
        if let (Some(a), Some(b)) = (
            members.iter().find(|m| m.key == "rollout_percentage"),
            members.iter().find(|m| m.key == "rollout_basis_points"),
        ) {
            let later = if a.key_pos.line > b.key_pos.line
                || (a.key_pos.line == b.key_pos.line && a.key_pos.column > b.key_pos.column)
            {
                a
            } else {
                b
            };
            self.problem(
                &JPath::Key(path, &later.key),
                later.key_pos,
                "give rollout_percentage or rollout_basis_points, not both",
            );
        }
        (self.problems.len() == before).then_some(spec)
    }

    fn basis_points(&mut self, path: &JPath<'_>, node: &Node) -> Option<BasisPoints> {
        let Kind::Number(text) = &node.kind else {
            self.wrong_type(path, node, "an integer 0..10000 (basis points)");
            return None;
        };
        match text.parse::<u16>().ok().and_then(BasisPoints::new) {
            Some(p) => Some(p),
            None => {
                self.problem(
                    path,
                    node.pos,
                    format!("must be an integer 0..10000 (basis points), got {text}"),
                );
                None
            }
        }
    }

    fn variants(&mut self, path: &JPath<'_>, node: &Node) -> Option<Variants> {
        let members = self.object(
            path,
            node,
            "an object mapping variant names to {\"value\": ..., \"weight\": N}",
        )?;
        let before = self.problems.len();
        if members.len() > MAX_VARIANTS {
            self.problem(
                path,
                node.pos,
                format!("{} variants; at most {MAX_VARIANTS}", members.len()),
            );
        }
        let mut out = Vec::with_capacity(members.len());
        for m in &members {
            let p = JPath::Key(path, &m.key);
            let chars = m.key.chars().count();
            if chars == 0
                || chars > MAX_VARIANT_NAME_CHARS
                || !m
                    .key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                self.problem(
                    &p,
                    m.key_pos,
                    format!(
                        "variant name {:?} must be 1..{MAX_VARIANT_NAME_CHARS} of A-Z a-z 0-9 _ - .",
                        m.key
                    ),
                );
            }
            let Some(fields) = self.object(&p, &m.value, "a variant object {\"value\": ..., \"weight\": N}") else {
                continue;
            };
            let mut value = None;
            let mut weight = None;
            for f in &fields {
                let fp = JPath::Key(&p, &f.key);
                match f.key.as_str() {
                    "value" => {
                        if matches!(f.value.kind, Kind::Null) {
                            self.problem(&fp, f.value.pos, "a variant's value must not be null");
                        } else {
                            value = Some(to_json_value(&f.value));
                        }
                    }
                    "weight" => match &f.value.kind {
                        Kind::Number(t) => match t.parse::<u32>().ok().filter(|w| *w <= MAX_VARIANT_WEIGHT) {
                            Some(w) => weight = Some(w),
                            None => self.problem(
                                &fp,
                                f.value.pos,
                                format!("weight must be an integer 0..{MAX_VARIANT_WEIGHT}, got {t}"),
                            ),
                        },
                        _ => self.wrong_type(&fp, &f.value, "an integer weight"),
                    },
                    other => self.problem(
                        &fp,
                        f.key_pos,
                        format!("unknown field {other:?} in a variant; a variant has value, weight"),
                    ),
                }
            }
            if value.is_none() && !fields.iter().any(|f| f.key == "value") {
                self.problem(&p, m.value.pos, "variant is missing \"value\"");
            }
            if weight.is_none() && !fields.iter().any(|f| f.key == "weight") {
                self.problem(&p, m.value.pos, "variant is missing \"weight\"");
            }
            if let (Some(value), Some(weight)) = (value, weight) {
                out.push((
                    Variant {
                        name: m.key.clone(),
                        value,
                        weight,
                    },
                    m.key_pos,
                ));
            }
        }
        if self.problems.len() != before {
            return None;
        }
        // Types: name the first variant whose type differs, where it is.
        if let Some((first, _)) = out.first() {
            let kind = value_kind(&first.value);
            if let Some((odd, pos)) = out.iter().find(|(v, _)| value_kind(&v.value) != kind) {
                self.problem(
                    &JPath::Key(&JPath::Key(path, &odd.name), "value"),
                    *pos,
                    format!(
                        "variant {:?} is {}, but {:?} is {}: all variants must have the same type",
                        odd.name,
                        value_kind(&odd.value),
                        first.name,
                        kind
                    ),
                );
                return None;
            }
        }
        match Variants::new(out.into_iter().map(|(v, _)| v).collect()) {
            Ok(v) => Some(v),
            Err(message) => {
                self.problem(path, node.pos, message);
                None
            }
        }
    }

    fn prerequisites(&mut self, path: &JPath<'_>, node: &Node) -> Vec<Prerequisite> {
        let Some(items) = self.array(
            path,
            node,
            "a list of prerequisites {\"flag\": NAME, \"is\": \"on\"|\"off\"} or {\"flag\": NAME, \"variant\": V}",
        ) else {
            return Vec::new();
        };
        let mut out: Vec<Prerequisite> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = JPath::Index(path, i);
            let Some(fields) = self.object(&p, item, "a prerequisite object") else {
                continue;
            };
            let before = self.problems.len();
            let mut flag = None;
            let mut requirement = None;
            for f in &fields {
                let fp = JPath::Key(&p, &f.key);
                match f.key.as_str() {
                    "flag" => flag = self.non_empty_string(&fp, &f.value),
                    "is" => match self.string(&fp, &f.value).as_deref() {
                        Some("on") => requirement = Some(Requirement::On),
                        Some("off") => requirement = Some(Requirement::Off),
                        Some(other) => self.problem(&fp, f.value.pos, format!("{other:?} is not \"on\" or \"off\"")),
                        None => {}
                    },
                    "variant" => requirement = self.non_empty_string(&fp, &f.value).map(Requirement::Variant),
                    other => self.problem(
                        &fp,
                        f.key_pos,
                        format!("unknown field {other:?} in a prerequisite; a prerequisite has flag and is or variant"),
                    ),
                }
            }
            if fields.iter().any(|f| f.key == "is") && fields.iter().any(|f| f.key == "variant") {
                self.problem(&p, item.pos, "give \"is\" or \"variant\", not both");
            }
            if !fields.iter().any(|f| f.key == "flag") {
                self.problem(&p, item.pos, "prerequisite is missing \"flag\"");
            }
            if self.problems.len() != before {
                continue;
            }
            if let Some(flag) = flag {
                if out.iter().any(|q| q.flag == flag) {
                    self.problem(&p, item.pos, format!("flag {flag:?} is already a prerequisite"));
                    continue;
                }
                let q = Prerequisite {
                    flag,
                    requirement: requirement.unwrap_or(Requirement::On),
                };
                self.prereqs
                    .push((self.flag.clone().unwrap_or_default(), i, item.pos, q.clone()));
                out.push(q);
            }
        }
        out
    }

    /// Checks across flags: prerequisites name existing flags and variants,
    /// form no cycle and stay within the depth and size bounds. Runs over
    /// every well-formed prerequisite, also of flags with other problems.
    fn check_prerequisites(&mut self, names: &[&str], flags: &BTreeMap<String, FlagSpec>) {
        let prereqs = std::mem::take(&mut self.prereqs);
        let mut graph: BTreeMap<&str, Vec<(usize, Pos, &Prerequisite)>> = BTreeMap::new();
        let mut graph_ok = true;
        for (name, i, pos, q) in &prereqs {
            let p = JPath::Index(&JPath::Key(&JPath::Key(&JPath::Root, name), "prerequisites"), *i);
            self.flag = Some(name.clone());
            if q.flag == *name {
                self.problem(&p, *pos, "a flag cannot be its own prerequisite");
                graph_ok = false;
            } else if !names.contains(&q.flag.as_str()) {
                self.problem(&p, *pos, format!("prerequisite flag {:?} is not in the config", q.flag));
                graph_ok = false;
            } else if let Requirement::Variant(v) = &q.requirement {
                match flags.get(&q.flag).map(|f| f.variants.as_ref()) {
                    Some(Some(vs)) if vs.get(v).is_none() => {
                        self.problem(&p, *pos, format!("flag {:?} has no variant {v:?}", q.flag));
                    }
                    Some(None) => {
                        self.problem(
                            &p,
                            *pos,
                            format!("flag {:?} has no variants; require \"is\": \"on\" or \"off\"", q.flag),
                        );
                    }
                    _ => {}
                }
            }
            self.flag = None;
            graph.entry(name.as_str()).or_default().push((*i, *pos, q));
        }
        if !graph_ok {
            return;
        }
        // Cycles: depth-first search in name order; each cycle reported once,
        // at the prerequisite that leaves the first flag of the cycle found.
        type Graph<'g> = BTreeMap<&'g str, Vec<(usize, Pos, &'g Prerequisite)>>;
        fn visit<'a>(
            name: &'a str,
            graph: &Graph<'a>,
            state: &mut BTreeMap<&'a str, u8>,
            stack: &mut Vec<&'a str>,
            cycles: &mut Vec<Vec<&'a str>>,
        ) {
            state.insert(name, 1);
            stack.push(name);
            for (_, _, q) in graph.get(name).map(Vec::as_slice).unwrap_or_default() {
                match state.get(q.flag.as_str()) {
                    Some(1) => {
                        let from = stack.iter().position(|s| *s == q.flag).unwrap_or(0);
                        let mut c: Vec<&str> = stack[from..].to_vec();
                        c.push(q.flag.as_str());
                        cycles.push(c);
                    }
                    Some(_) => {}
                    None => visit(q.flag.as_str(), graph, state, stack, cycles),
                }
            }
            stack.pop();
            state.insert(name, 2);
        }
        let mut state: BTreeMap<&str, u8> = BTreeMap::new();
        let mut cycles: Vec<Vec<&str>> = Vec::new();
        for name in graph.keys() {
            if !state.contains_key(name) {
                visit(name, &graph, &mut state, &mut Vec::new(), &mut cycles);
            }
        }
        for c in &cycles {
            let (first, next) = (c[0], c[1]);
            let Some((i, pos, _)) = graph
                .get(first)
                .and_then(|qs| qs.iter().find(|(_, _, q)| q.flag == next))
            else {
                continue;
            };
            self.flag = Some(first.to_owned());
            self.problem(
                &JPath::Index(&JPath::Key(&JPath::Key(&JPath::Root, first), "prerequisites"), *i),
                *pos,
                format!("prerequisites form a cycle: {}", c.join(" -> ")),
            );
            self.flag = None;
        }
        if !cycles.is_empty() {
            return;
        }
        // Depth and size of each flag's prerequisite tree (acyclic now).
        fn measure<'a>(
            name: &'a str,
            graph: &Graph<'a>,
            memo: &mut BTreeMap<&'a str, (usize, usize)>,
        ) -> (usize, usize) {
            if let Some(m) = memo.get(name) {
                return *m;
            }
            let mut depth = 0;
            let mut size = 1usize;
            for (_, _, q) in graph.get(name).map(Vec::as_slice).unwrap_or_default() {
                let (d, s) = measure(q.flag.as_str(), graph, memo);
                depth = depth.max(d + 1);
                size = size.saturating_add(s);
            }
            memo.insert(name, (depth, size));
            (depth, size)
        }
        let mut memo: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (name, qs) in &graph {
            let (depth, size) = measure(name, &graph, &mut memo);
            let p = JPath::Key(&JPath::Key(&JPath::Root, name), "prerequisites");
            let pos = qs.first().map_or(Pos { line: 1, column: 1 }, |(_, pos, _)| *pos);
            self.flag = Some((*name).to_owned());
            if depth > MAX_PREREQUISITE_DEPTH {
                self.problem(
                    &p,
                    pos,
                    format!("prerequisite chain is {depth} levels deep; at most {MAX_PREREQUISITE_DEPTH}"),
                );
            } else if size - 1 > MAX_PREREQUISITE_EVALUATIONS {
                self.problem(
                    &p,
                    pos,
                    format!(
                        "prerequisites expand to {} flag evaluations; at most {MAX_PREREQUISITE_EVALUATIONS}",
                        size - 1
                    ),
                );
            }
            self.flag = None;
        }
    }

    fn boolean(&mut self, path: &JPath<'_>, node: &Node) -> Option<bool> {
        match node.kind {
            Kind::Bool(b) => Some(b),
            _ => {
                self.wrong_type(path, node, "true or false");
                None
            }
        }
    }

    fn string(&mut self, path: &JPath<'_>, node: &Node) -> Option<String> {
        match &node.kind {
            Kind::String(s) => Some(s.clone()),
            _ => {
                self.wrong_type(path, node, "a string");
                None
            }
        }
    }

    fn non_empty_string(&mut self, path: &JPath<'_>, node: &Node) -> Option<String> {
        let s = self.string(path, node)?;
        if s.is_empty() {
            self.problem(path, node.pos, "must not be empty");
            return None;
        }
        Some(s)
    }

    fn percentage(&mut self, path: &JPath<'_>, node: &Node) -> Option<Percentage> {
        let Kind::Number(text) = &node.kind else {
            self.wrong_type(path, node, "an integer 0..100");
            return None;
        };
        match text.parse::<u8>().ok().and_then(Percentage::new) {
            Some(p) => Some(p),
            None => {
                self.problem(path, node.pos, format!("must be an integer 0..100, got {text}"));
                None
            }
        }
    }

    fn array<'n>(&mut self, path: &JPath<'_>, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Array(items) => Some(items),
            _ => {
                self.wrong_type(path, node, what);
                None
            }
        }
    }

    fn environments(&mut self, path: &JPath<'_>, node: &Node) -> Option<Vec<String>> {
        let items = self.array(path, node, "a list of environment names")?;
        let mut out: Vec<String> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let p = JPath::Index(path, i);
            if let Some(s) = self.non_empty_string(&p, item) {
                if out.contains(&s) {
                    self.problem(&p, item.pos, format!("environment {s:?} is listed twice"));
                } else {
                    out.push(s);
                }
            }
        }
        Some(out)
    }

    fn metadata(&mut self, path: &JPath<'_>, node: &Node) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        let Some(members) = self.object(path, node, "an object") else {
            return out;
        };
        for m in members {
            let p = JPath::Key(path, &m.key);
            if m.key == "phase" {
                let ok = matches!(&m.value.kind, Kind::Number(t) if matches!(t.as_str(), "1" | "2" | "3" | "4"));
                if !ok {
                    self.problem(
                        &p,
                        m.value.pos,
                        "metadata.phase must be an integer 1..4 (the rollout phase)",
                    );
                }
            }
            out.insert(m.key.clone(), to_json_value(&m.value));
        }
        out
    }

    fn conditions(&mut self, path: &JPath<'_>, node: &Node) -> Vec<Condition> {
        let Some(items) = self.array(path, node, "a list of conditions") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(c) = self.condition(&JPath::Index(path, i), item) {
                out.push(c);
            }
        }
        out
    }

    fn condition(&mut self, path: &JPath<'_>, node: &Node) -> Option<Condition> {
        macro_rules! forms {
            () => {
                "{\"user_id\": S}, {\"session_type\": S}, {\"custom\": NAME} or \
                 {\"attribute\": KEY, \"op\": OP, \"values\": [...]}"
            };
        }
        const FORMS: &str = forms!();
        let members = self.object(path, node, concat!("a condition object: ", forms!()))?;
        let get = |k: &str| members.iter().find(|m| m.key == k).map(|m| &m.value);
        let single = match members.as_slice() {
            [m] if !matches!(m.key.as_str(), "attribute" | "op" | "values") => Some(*m),
            _ => None,
        };
        if let Some(m) = single {
            let p = JPath::Key(path, &m.key);
            return match m.key.as_str() {
                "user_id" | "session_type" => {
                    let value = self.string(&p, &m.value)?;
                    Some(Condition::Equals {
                        attribute: m.key.clone(),
                        value,
                    })
                }
                "custom" => Some(Condition::Custom {
                    name: self.non_empty_string(&p, &m.value)?,
                }),
                _ => {
                    self.problem(
                        &p,
                        m.key_pos,
                        format!("unknown condition {:?}; expected {FORMS}", m.key),
                    );
                    None
                }
            };
        }
        let before = self.problems.len();
        for m in &members {
            if !matches!(m.key.as_str(), "attribute" | "op" | "values") {
                self.problem(
                    &JPath::Key(path, &m.key),
                    m.key_pos,
                    format!("unknown field {:?} in a condition; expected {FORMS}", m.key),
                );
            }
        }
        let (Some(attr), Some(op), Some(values)) = (get("attribute"), get("op"), get("values")) else {
            let missing: Vec<&str> = ["attribute", "op", "values"]
                .into_iter()
                .filter(|k| get(k).is_none())
                .collect();
            self.problem(
                path,
                node.pos,
                format!("condition is missing {}; expected {FORMS}", missing.join(", ")),
            );
            return None;
        };
        let attribute = self.non_empty_string(&JPath::Key(path, "attribute"), attr);
        let op_path = JPath::Key(path, "op");
        let op_name = self.string(&op_path, op);
        let values_path = JPath::Key(path, "values");
        let items = self.array(&values_path, values, "a list of values");
        let (Some(attribute), Some(op_name), Some(items)) = (attribute, op_name, items) else {
            return None;
        };
        if !OPERATORS.contains(&op_name.as_str()) {
            self.problem(
                &op_path,
                op.pos,
                format!("unknown op {op_name:?}; expected one of {}", OPERATORS.join(", ")),
            );
            return None;
        }
        if items.is_empty() {
            self.problem(&values_path, values.pos, "values must not be empty");
            return None;
        }
        let op = self.operator(&op_name, &values_path, values, items)?;
        (self.problems.len() == before).then_some(Condition::Match { attribute, op })
    }

    fn operator(&mut self, name: &str, path: &JPath<'_>, node: &Node, items: &[Node]) -> Option<Operator> {
        let strings = |v: &mut Self| -> Option<Vec<String>> {
            let before = v.problems.len();
            let out: Vec<String> = items
                .iter()
                .enumerate()
                .filter_map(|(i, it)| v.string(&JPath::Index(path, i), it))
                .collect();
            (v.problems.len() == before).then_some(out)
        };
        let single = |v: &mut Self| -> Option<&Node> {
            match items {
                [one] => Some(one),
                _ => {
                    v.problem(
                        path,
                        node.pos,
                        format!("op {name:?} takes exactly one value, got {}", items.len()),
                    );
                    None
                }
            }
        };
        let number = |v: &mut Self| -> Option<Number> {
            let it = single(v)?;
            let p = JPath::Index(path, 0);
            match &it.kind {
                Kind::Number(t) => match parse_number(t) {
                    Some(n) => Some(n),
                    None => {
                        v.problem(&p, it.pos, format!("number {t} is out of range"));
                        None
                    }
                },
                _ => {
                    v.wrong_type(&p, it, "a number");
                    None
                }
            }
        };
        let version = |v: &mut Self| -> Option<semver::Version> {
            let it = single(v)?;
            let p = JPath::Index(path, 0);
            let s = v.string(&p, it)?;
            match semver::Version::parse(&s) {
                Ok(ver) => Some(ver),
                Err(e) => {
                    v.problem(
                        &p,
                        it.pos,
                        format!("{s:?} is not a semantic version (MAJOR.MINOR.PATCH): {e}"),
                    );
                    None
                }
            }
        };
        Some(match name {
            "in" | "not_in" => {
                let before = self.problems.len();
                let mut lits = Vec::with_capacity(items.len());
                for (i, it) in items.iter().enumerate() {
                    match &it.kind {
                        Kind::String(s) => lits.push(Literal::Str(s.clone())),
                        Kind::Number(t) => match t.parse::<i64>() {
                            Ok(n) => lits.push(Literal::Int(n)),
                            Err(_) => self.problem(
                                &JPath::Index(path, i),
                                it.pos,
                                format!("{t} is not an integer in the 64-bit range"),
                            ),
                        },
                        _ => self.wrong_type(&JPath::Index(path, i), it, "a string or an integer"),
                    }
                }
                if self.problems.len() != before {
                    return None;
                }
                if name == "in" {
                    Operator::In(lits)
                } else {
                    Operator::NotIn(lits)
                }
            }
            "prefix" => Operator::Prefix(strings(self)?),
            "suffix" => Operator::Suffix(strings(self)?),
            "contains" => Operator::Contains(strings(self)?),
            "lt" => Operator::Lt(number(self)?),
            "lte" => Operator::Lte(number(self)?),
            "gt" => Operator::Gt(number(self)?),
            "gte" => Operator::Gte(number(self)?),
            "semver_lt" => Operator::SemverLt(version(self)?),
            "semver_gte" => Operator::SemverGte(version(self)?),
            _ => return None,
        })
    }

    fn schedule(&mut self, path: &JPath<'_>, node: &Node) -> Option<Schedule> {
        let items = self.array(path, node, "a list of stages")?;
        let before = self.problems.len();
        let mut stages: Vec<(Stage, Pos)> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let p = JPath::Index(path, i);
            if let Some(stage) = self.stage(&p, item) {
                stages.push((stage, item.pos));
            }
        }
        if self.problems.len() != before {
            return None;
        }
        if items.is_empty() {
            self.problem(path, node.pos, "schedule must have at least one stage (or be left out)");
            return None;
        }
        for (i, w) in stages.windows(2).enumerate() {
            if let [(prev, _), (next, pos)] = w {
                if next.at <= prev.at {
                    self.problem(
                        &JPath::Key(&JPath::Index(path, i + 1), "at"),
                        *pos,
                        format!(
                            "stages must be sorted by time: {} is not after the previous stage's {}",
                            format_time(next.at),
                            format_time(prev.at)
                        ),
                    );
                }
            }
        }
        if self.problems.len() != before {
            return None;
        }
        Schedule::new(stages.into_iter().map(|(s, _)| s).collect()).ok()
    }

    fn stage(&mut self, path: &JPath<'_>, node: &Node) -> Option<Stage> {
        let members = self.object(path, node, "a stage object")?;
        let before = self.problems.len();
        let mut at = None;
        let mut stage = Stage {
            at: OffsetDateTime::UNIX_EPOCH,
            enabled: None,
            rollout_percentage: None,
            rollout_basis_points: None,
            environments: None,
        };
        for m in &members {
            let p = JPath::Key(path, &m.key);
            match m.key.as_str() {
                "at" => {
                    if let Some(s) = self.string(&p, &m.value) {
                        match parse_time(&s) {
                            Ok(t) => at = Some(t),
                            Err(e) => self.problem(&p, m.value.pos, e),
                        }
                    }
                }
                "enabled" => stage.enabled = self.boolean(&p, &m.value),
                "rollout_percentage" => stage.rollout_percentage = self.percentage(&p, &m.value),
                "rollout_basis_points" => stage.rollout_basis_points = self.basis_points(&p, &m.value),
                "environments" => stage.environments = self.environments(&p, &m.value),
                other => self.problem(
                    &p,
                    m.key_pos,
                    format!(
                        "unknown field {other:?} in a stage; a stage has at, enabled, rollout_percentage, \
                         rollout_basis_points, environments"
                    ),
                ),
            }
        }
        if let Some(m) = members.iter().find(|m| m.key == "rollout_basis_points") {
            if members.iter().any(|m| m.key == "rollout_percentage") {
                self.problem(
                    &JPath::Key(path, "rollout_basis_points"),
                    m.key_pos,
                    "give rollout_percentage or rollout_basis_points, not both",
                );
            }
        }
        match at {
            Some(t) => stage.at = t,
            None if self.problems.len() == before => {
                self.problem(path, node.pos, "stage is missing \"at\" (an RFC 3339 time)");
            }
            None => {}
        }
        (self.problems.len() == before).then_some(stage)
    }
}

/// One `week_N` entry of a week plan: the stage fields without `at`.
pub(crate) struct WeekStage {
    pub week: u32,
    pub stage: Stage,
}

/// Parse a week plan (`{flag: {"week_N": {enabled, rollout_percentage,
/// environments}}}`), weeks sorted numerically; `at` is left at the epoch.
pub(crate) fn parse_week_plan(input: &[u8]) -> Result<BTreeMap<String, Vec<WeekStage>>, ConfigError> {
    let root = json::parse(input)?;
    let mut v = Validator::default();
    let mut out = BTreeMap::new();
    if let Some(flags) = v.object(&JPath::Root, &root, "an object mapping flag names to week plans") {
        for f in flags {
            v.flag = Some(f.key.clone());
            let fpath = JPath::Key(&JPath::Root, &f.key);
            let Some(weeks) = v.object(&fpath, &f.value, "an object mapping week_N to a stage") else {
                continue;
            };
            let mut stages: Vec<WeekStage> = Vec::new();
            for w in weeks {
                let wpath = JPath::Key(&fpath, &w.key);
                let n = w
                    .key
                    .strip_prefix("week_")
                    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse::<u32>().ok())
                    .filter(|n| *n >= 1);
                let Some(n) = n else {
                    v.problem(&wpath, w.key_pos, format!("{:?} is not week_N with N >= 1", w.key));
                    continue;
                };
                if stages.iter().any(|s| s.week == n) {
                    v.problem(&wpath, w.key_pos, format!("week {n} appears twice"));
                    continue;
                }
                if let Some(m) = w.value.kind_members() {
                    if m.iter().any(|m| m.key == "at") {
                        v.problem(
                            &JPath::Key(&wpath, "at"),
                            w.value.pos,
                            "a week plan stage takes its time from week_N; remove \"at\"",
                        );
                        continue;
                    }
                }
                // Reuse stage validation with a placeholder time.
                let mut with_at = w.value.clone();
                if let Kind::Object(members) = &mut with_at.kind {
                    members.push(Member {
                        key: "at".into(),
                        key_pos: w.value.pos,
                        value: Node {
                            pos: w.value.pos,
                            kind: Kind::String("1970-01-01T00:00:00Z".into()),
                        },
                    });
                }
                if let Some(stage) = v.stage(&wpath, &with_at) {
                    stages.push(WeekStage { week: n, stage });
                }
            }
            stages.sort_by_key(|s| s.week);
            out.insert(f.key.clone(), stages);
            v.flag = None;
        }
    }
    if v.problems.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError::Invalid(v.problems))
    }
}

/// Parse a JSON number's text into an integer if exact, else a finite float.
fn parse_number(text: &str) -> Option<Number> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Number::Int(i));
    }
    let f: f64 = text.parse().ok()?;
    f.is_finite().then_some(Number::Float(f))
}

/// Convert a parsed node to serde_json (for free-form metadata).
fn to_json_value(node: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &node.kind {
        Kind::Null => J::Null,
        Kind::Bool(b) => J::Bool(*b),
        Kind::Number(t) => serde_json::from_str(t).unwrap_or(J::String(t.clone())),
        Kind::String(s) => J::String(s.clone()),
        Kind::Array(items) => J::Array(items.iter().map(to_json_value).collect()),
        Kind::Object(members) => J::Object(
            members
                .iter()
                .map(|m| (m.key.clone(), to_json_value(&m.value)))
                .collect(),
        ),
    }
}
