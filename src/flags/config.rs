//! The flag config file (DESIGN §3.1): a typed model that is valid by
//! construction, and the strict loader that builds it from JSON, reporting
//! every problem at once with the flag name, the JSON path and the position.

use std::collections::BTreeMap;
use std::fmt;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::json::{self, Kind, Member, Node, Pos, SyntaxError};

/// Longest flag name: Erlang atoms hold at most 255 characters.
pub const MAX_FLAG_NAME_CHARS: usize = 255;

/// A whole config file: flag name -> flag, in name order.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::FlagsConfig;
/// let config = FlagsConfig::from_json(br#"{"mcp_tasks": {"enabled": true, "rollout_percentage": 10}}"#)?;
/// assert_eq!(config.get("mcp_tasks").map(|f| f.rollout_percentage.get()), Some(10));
/// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct FlagsConfig {
    flags: BTreeMap<String, FlagSpec>,
}

/// One flag as written in the config.
#[derive(Clone, Debug, PartialEq)]
pub struct FlagSpec {
    /// Master switch (default `false`).
    pub enabled: bool,
    /// Share of stickiness buckets that get the flag (default 100):
    /// `phash2(Value, 100) < P`. Unused when `rollout_basis_points` is set.
    pub rollout_percentage: Percentage,
    /// The finer rollout, replacing `rollout_percentage` when set:
    /// `phash2(Value, 10000) < BP` (hash contract v1, see [`super::phash2`]).
    pub rollout_basis_points: Option<BasisPoints>,
    /// Where the flag may be on; `None` = every environment, empty = none.
    pub environments: Option<Vec<String>>,
    /// All must hold.
    pub conditions: Vec<Condition>,
    /// Free-form; `phase` (1..=4) drives the CI matrix.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Context key whose value is hashed for the rollout (default `session_id`).
    pub stickiness: String,
    /// When set, buckets are `phash2({Salt, Value}, 100)`.
    pub salt: Option<String>,
    /// Time-staged rollout, stages strictly increasing in time.
    pub schedule: Option<Schedule>,
    /// Named values with weights; an enabled flag serves one of them per
    /// stickiness value (see [`Variants`]).
    pub variants: Option<Variants>,
    /// Flags that must be in a given state for this one to be on (checked in
    /// order after `enabled` and `environments`).
    pub prerequisites: Vec<Prerequisite>,
}

impl Serialize for FlagSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("enabled", &self.enabled)?;
        match &self.rollout_basis_points {
            Some(bp) => m.serialize_entry("rollout_basis_points", bp)?,
            None => m.serialize_entry("rollout_percentage", &self.rollout_percentage)?,
        }
        if let Some(e) = &self.environments {
            m.serialize_entry("environments", e)?;
        }
        m.serialize_entry("conditions", &self.conditions)?;
        m.serialize_entry("metadata", &self.metadata)?;
        m.serialize_entry("stickiness", &self.stickiness)?;
        if let Some(salt) = &self.salt {
            m.serialize_entry("salt", salt)?;
        }
        if let Some(schedule) = &self.schedule {
            m.serialize_entry("schedule", schedule)?;
        }
        if let Some(v) = &self.variants {
            m.serialize_entry("variants", v)?;
        }
        if !self.prerequisites.is_empty() {
            m.serialize_entry("prerequisites", &self.prerequisites)?;
        }
        m.end()
    }
}

impl Default for FlagSpec {
    fn default() -> Self {
        FlagSpec {
            enabled: false,
            rollout_percentage: Percentage::FULL,
            rollout_basis_points: None,
            environments: None,
            conditions: Vec::new(),
            metadata: serde_json::Map::new(),
            stickiness: DEFAULT_STICKINESS.to_owned(),
            salt: None,
            schedule: None,
            variants: None,
            prerequisites: Vec::new(),
        }
    }
}

/// The default stickiness key, as in the reference.
pub const DEFAULT_STICKINESS: &str = "session_id";

impl FlagSpec {
    /// `metadata.phase`, when it is an integer 1..=4.
    pub fn phase(&self) -> Option<u8> {
        self.metadata
            .get("phase")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| u8::try_from(p).ok())
    }
}

/// An integer percentage 0..=100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Percentage(u8);

impl Percentage {
    /// 100 %.
    pub const FULL: Percentage = Percentage(100);

    /// `Some` when `value <= 100`.
    pub fn new(value: u8) -> Option<Percentage> {
        (value <= 100).then_some(Percentage(value))
    }

    /// The value, 0..=100.
    pub fn get(self) -> u8 {
        self.0
    }
}

/// A finer rollout share in basis points, 0..=10000 (10000 = everyone):
/// in when `phash2(Value, 10000) < BP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BasisPoints(u16);

impl BasisPoints {
    /// 100 %.
    pub const FULL: BasisPoints = BasisPoints(10_000);

    /// `Some` when `value <= 10000`.
    pub fn new(value: u16) -> Option<BasisPoints> {
        (value <= 10_000).then_some(BasisPoints(value))
    }

    /// The value, 0..=10000.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// Longest variant name (it may become an Erlang atom in callers' code).
pub const MAX_VARIANT_NAME_CHARS: usize = 255;
/// Most variants a flag may declare.
pub const MAX_VARIANTS: usize = 64;
/// Largest weight of one variant (weights are relative; the sum must be > 0).
pub const MAX_VARIANT_WEIGHT: u32 = 1_000_000;
/// Longest chain of prerequisites (a -> b -> c is 2): evaluation of a flag
/// visits at most this many levels, so a NIF call stays bounded.
pub const MAX_PREREQUISITE_DEPTH: usize = 8;
/// Most flag evaluations one flag's prerequisite tree may expand to
/// (counting a parent reached twice twice).
pub const MAX_PREREQUISITE_EVALUATIONS: usize = 64;

/// A flag's variants, in config order: each a name, a JSON value and a
/// relative weight. All values have the same JSON type ([`Variants::kind`]).
///
/// Assignment (hash contract v1, documented in `docs/flags.md`): the cohort
/// value `B = phash2(Value, 10000)` (salted: `phash2({Salt, Value}, 10000)`)
/// picks, by weighted rendezvous hashing, the variant `i` with the smallest
/// `-ln(U_i) / W_i`, where `U_i = (phash2({NameBinary_i, B}, 2^32) + 0.5) / 2^32`.
/// Changing one variant's weight only moves sessions into or out of that
/// variant; adding a variant only moves sessions into it.
#[derive(Clone, Debug, PartialEq)]
pub struct Variants(Vec<Variant>);

/// One variant.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Variant {
    /// Its name (1..=255 of `A-Z a-z 0-9 _ - .`).
    #[serde(skip)]
    pub name: String,
    /// The value served (never `null`).
    pub value: serde_json::Value,
    /// Relative weight, 0..=[`MAX_VARIANT_WEIGHT`]; 0 = never chosen.
    pub weight: u32,
}

impl Variants {
    /// Build from variants; fails with a message when names repeat, all
    /// weights are 0, a value is null or the values' types differ.
    pub fn new(variants: Vec<Variant>) -> Result<Variants, String> {
        if variants.is_empty() {
            return Err("variants must not be empty (or be left out)".into());
        }
        if variants.iter().all(|v| v.weight == 0) {
            return Err("at least one variant must have a weight above 0".into());
        }
        let mut names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("variant {:?} is declared twice", w[0]));
        }
        let first = value_kind(&variants[0].value);
        if let Some(v) = variants.iter().find(|v| value_kind(&v.value) != first) {
            return Err(format!(
                "variant {:?} is {}, but {:?} is {}: all variants must have the same type",
                v.name,
                value_kind(&v.value),
                variants[0].name,
                first
            ));
        }
        if first == "null" {
            return Err("a variant's value must not be null".into());
        }
        Ok(Variants(variants))
    }

    /// The variants, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Variant> {
        self.0.iter()
    }

    /// The variant named `name`.
    pub fn get(&self, name: &str) -> Option<&Variant> {
        self.0.iter().find(|v| v.name == name)
    }

    /// Number of variants.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always `false` (a `Variants` has at least one).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values' JSON type: `boolean`, `string`, `integer`, `float`,
    /// `object` or `array`.
    pub fn kind(&self) -> &'static str {
        self.0.first().map_or("null", |v| value_kind(&v.value))
    }
}

/// The JSON type of a variant value; integers and floats are different types.
pub fn value_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value as J;
    match v {
        J::Null => "null",
        J::Bool(_) => "boolean",
        J::Number(n) if n.is_i64() || n.is_u64() => "integer",
        J::Number(_) => "float",
        J::String(_) => "string",
        J::Array(_) => "array",
        J::Object(_) => "object",
    }
}

impl Serialize for Variants {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for v in &self.0 {
            m.serialize_entry(&v.name, v)?;
        }
        m.end()
    }
}

/// A prerequisite: flag `flag` must evaluate (for the same context) to the
/// required state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prerequisite {
    /// The parent flag.
    pub flag: String,
    /// What it must evaluate to.
    pub requirement: Requirement,
}

/// The state a prerequisite requires of its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `"is": "on"` (the default): the parent is on.
    On,
    /// `"is": "off"`: the parent is off.
    Off,
    /// `"variant": NAME`: the parent is on and serves this variant.
    Variant(String),
}

impl Serialize for Prerequisite {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("flag", &self.flag)?;
        match &self.requirement {
            Requirement::On => m.serialize_entry("is", "on")?,
            Requirement::Off => m.serialize_entry("is", "off")?,
            Requirement::Variant(v) => m.serialize_entry("variant", v)?,
        }
        m.end()
    }
}

impl fmt::Display for Prerequisite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.requirement {
            Requirement::On => write!(f, "{:?} is on", self.flag),
            Requirement::Off => write!(f, "{:?} is off", self.flag),
            Requirement::Variant(v) => write!(f, "{:?} serves variant {v:?}", self.flag),
        }
    }
}

/// Stages sorted strictly by time.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Schedule(Vec<Stage>);

impl Schedule {
    /// Build a schedule; fails with the index of the first stage that is not
    /// strictly after its predecessor.
    pub fn new(stages: Vec<Stage>) -> Result<Schedule, usize> {
        match stages.windows(2).position(|w| w[1].at <= w[0].at) {
            Some(i) => Err(i + 1),
            None => Ok(Schedule(stages)),
        }
    }

    /// The stages, oldest first.
    pub fn stages(&self) -> &[Stage] {
        &self.0
    }
}

/// One schedule stage: from `at` on, its fields replace the flag's.
/// A field left out keeps the flag's base value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    /// When the stage takes effect.
    #[serde(serialize_with = "ser_time")]
    pub at: OffsetDateTime,
    /// Replaces `enabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Replaces the rollout (`rollout_percentage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_percentage: Option<Percentage>,
    /// Replaces the rollout (in basis points; never together with `rollout_percentage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_basis_points: Option<BasisPoints>,
    /// Replaces `environments`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environments: Option<Vec<String>>,
}

fn ser_time<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

/// RFC 3339 text of a time (UTC).
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A condition; all of a flag's conditions must hold.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// `{"user_id": "u-1"}` or `{"session_type": "streaming"}`: the context
    /// value under `attribute` equals `value` (a binary with those bytes, or
    /// an atom with that name).
    Equals {
        /// `user_id` or `session_type`.
        attribute: String,
        /// The expected text.
        value: String,
    },
    /// `{"custom": NAME}`: a predicate registered at runtime.
    Custom {
        /// The registered name.
        name: String,
    },
    /// `{"attribute": KEY, "op": OP, "values": [...]}`.
    Match {
        /// Context key.
        attribute: String,
        /// The operator and its operands.
        op: Operator,
    },
}

/// The general form's operators, each with its typed operands.
#[derive(Clone, Debug, PartialEq)]
pub enum Operator {
    /// The value equals one of these.
    In(Vec<Literal>),
    /// The value is present and equals none of these.
    NotIn(Vec<Literal>),
    /// The text starts with one of these.
    Prefix(Vec<String>),
    /// The text ends with one of these.
    Suffix(Vec<String>),
    /// The text contains one of these.
    Contains(Vec<String>),
    /// Numeric `<`.
    Lt(Number),
    /// Numeric `<=`.
    Lte(Number),
    /// Numeric `>`.
    Gt(Number),
    /// Numeric `>=`.
    Gte(Number),
    /// Semantic version `<`.
    SemverLt(semver::Version),
    /// Semantic version `>=`.
    SemverGte(semver::Version),
}

/// Operator names as written in the config.
pub const OPERATORS: [&str; 11] = [
    "in",
    "not_in",
    "prefix",
    "suffix",
    "contains",
    "lt",
    "lte",
    "gt",
    "gte",
    "semver_lt",
    "semver_gte",
];

impl Operator {
    /// The name as written in the config.
    pub fn name(&self) -> &'static str {
        match self {
            Operator::In(_) => "in",
            Operator::NotIn(_) => "not_in",
            Operator::Prefix(_) => "prefix",
            Operator::Suffix(_) => "suffix",
            Operator::Contains(_) => "contains",
            Operator::Lt(_) => "lt",
            Operator::Lte(_) => "lte",
            Operator::Gt(_) => "gt",
            Operator::Gte(_) => "gte",
            Operator::SemverLt(_) => "semver_lt",
            Operator::SemverGte(_) => "semver_gte",
        }
    }

    fn values_json(&self) -> Vec<serde_json::Value> {
        use serde_json::Value as J;
        let strings = |v: &Vec<String>| v.iter().map(|s| J::String(s.clone())).collect();
        match self {
            Operator::In(v) | Operator::NotIn(v) => v.iter().map(Literal::to_json).collect(),
            Operator::Prefix(v) | Operator::Suffix(v) | Operator::Contains(v) => strings(v),
            Operator::Lt(n) | Operator::Lte(n) | Operator::Gt(n) | Operator::Gte(n) => vec![n.to_json()],
            Operator::SemverLt(v) | Operator::SemverGte(v) => vec![J::String(v.to_string())],
        }
    }
}

/// A literal in `in` / `not_in`: a string matches binaries and atoms, an
/// integer matches integers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Literal {
    /// Text.
    Str(String),
    /// An integer.
    Int(i64),
}

impl Literal {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Literal::Str(s) => serde_json::Value::String(s.clone()),
            Literal::Int(i) => serde_json::Value::from(*i),
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Str(s) => write!(f, "{s:?}"),
            Literal::Int(i) => write!(f, "{i}"),
        }
    }
}

/// A number operand of `lt`/`lte`/`gt`/`gte`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    /// An integer, compared exactly.
    Int(i64),
    /// A finite float.
    Float(f64),
}

impl Number {
    fn to_json(self) -> serde_json::Value {
        match self {
            Number::Int(i) => serde_json::Value::from(i),
            Number::Float(f) => serde_json::Value::from(f),
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::Float(x) => write!(f, "{x}"),
        }
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Condition::Equals { attribute, value } => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(attribute, value)?;
                m.end()
            }
            Condition::Custom { name } => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("custom", name)?;
                m.end()
            }
            Condition::Match { attribute, op } => {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("attribute", attribute)?;
                m.serialize_entry("op", op.name())?;
                m.serialize_entry("values", &op.values_json())?;
                m.end()
            }
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Equals { attribute, value } => write!(f, "{attribute} == {value:?}"),
            Condition::Custom { name } => write!(f, "custom {name:?}"),
            Condition::Match { attribute, op } => {
                let values = op.values_json();
                let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
                write!(f, "{attribute} {} [{}]", op.name(), list.join(", "))
            }
        }
    }
}

/// One problem found in a config: which flag, where, what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The flag it belongs to (`None` for file-level problems).
    pub flag: Option<String>,
    /// JSONPath of the offending value, e.g. `$.mcp_tasks.conditions[0].op`.
    pub path: String,
    /// Line and column, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// See `line`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(flag) = &self.flag {
            write!(f, "flag {flag:?}: ")?;
        }
        write!(f, "{}", self.path)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, " (line {l}, column {c})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a config could not be loaded. Nothing is partially applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not JSON.
    #[error("invalid JSON at {0}")]
    Syntax(#[from] SyntaxError),
    /// JSON, but not a valid config: every problem found.
    #[error("{} problem(s) in the flag config:\n  {}", .0.len(), join_problems(.0))]
    Invalid(Vec<Problem>),
}

fn join_problems(p: &[Problem]) -> String {
    p.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
}

impl ConfigError {
    /// Every problem as a [`Problem`] (a syntax or I/O error becomes one).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Io { path, source } => vec![Problem {
                flag: None,
                path: "$".into(),
                line: None,
                column: None,
                message: format!("cannot read {path}: {source}"),
            }],
            ConfigError::Syntax(e) => vec![Problem {
                flag: None,
                path: "$".into(),
                line: Some(e.pos.line),
                column: Some(e.pos.column),
                message: format!("invalid JSON: {}", e.message),
            }],
            ConfigError::Invalid(p) => p.clone(),
        }
    }
}

impl FlagsConfig {
    /// Parse and validate a config. On failure, every problem is reported.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for malformed JSON (with line and column),
    /// [`ConfigError::Invalid`] listing every problem otherwise.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{ConfigError, FlagsConfig};
    /// let err = FlagsConfig::from_json(br#"{"a": {"rollout_percentage": 150, "colour": "red"}}"#).unwrap_err();
    /// let ConfigError::Invalid(problems) = err else { panic!() };
    /// assert_eq!(problems.len(), 2);
    /// assert_eq!(problems[0].path, "$.a.rollout_percentage");
    /// ```
    pub fn from_json(input: &[u8]) -> Result<FlagsConfig, ConfigError> {
        let root = json::parse(input)?;
        let mut v = Validator::default();
        let config = v.config(&root);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(v.problems))
        }
    }

    /// Read and validate a config file.
    ///
    /// # Errors
    /// As [`FlagsConfig::from_json`], plus [`ConfigError::Io`].
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<FlagsConfig, ConfigError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        FlagsConfig::from_json(&bytes)
    }

    /// Build from flags made in code.
    pub fn from_flags(flags: impl IntoIterator<Item = (String, FlagSpec)>) -> FlagsConfig {
        FlagsConfig {
            flags: flags.into_iter().collect(),
        }
    }

    /// The flag named `name`.
    pub fn get(&self, name: &str) -> Option<&FlagSpec> {
        self.flags.get(name)
    }

    /// Mutable access, e.g. to attach a schedule.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut FlagSpec> {
        self.flags.get_mut(name)
    }

    /// Flags in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FlagSpec)> {
        self.flags.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of flags.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// `true` when there are no flags.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Pretty JSON that [`FlagsConfig::from_json`] reads back unchanged.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }
}

/// Parse an RFC 3339 time (`2026-02-09T00:00:00Z`) or a date (`2026-02-09`,
/// meaning midnight UTC).
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &date_fmt)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| format!("{text:?} is not an RFC 3339 time (2026-02-09T00:00:00Z) or a date (2026-02-09)"))
}

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
struct Validator {
    problems: Vec<Problem>,
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

    fn config(&mut self, root: &Node) -> FlagsConfig {
        let mut flags = BTreeMap::new();
        let Some(members) = self.object(&JPath::Root, root, "an object mapping flag names to flags") else {
            return FlagsConfig { flags };
        };
        for m in &members {
            let path = JPath::Key(&JPath::Root, &m.key);
            self.flag = Some(m.key.clone());
            let chars = m.key.chars().count();
            if chars == 0 {
                self.problem(&path, m.key_pos, "flag name is empty");
            } else if chars > MAX_FLAG_NAME_CHARS {
                self.problem(
                    &path,
                    m.key_pos,
                    format!("flag name has {chars} characters; at most {MAX_FLAG_NAME_CHARS} (an Erlang atom's limit)"),
                );
            } else if m.key.chars().any(char::is_control) {
                self.problem(&path, m.key_pos, "flag name contains control characters");
            }
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
                other => self.problem(
                    &p,
                    m.key_pos,
                    format!(
                        "unknown field {other:?}; a flag has enabled, rollout_percentage, rollout_basis_points, \
                         environments, conditions, metadata, stickiness, salt, schedule, variants, prerequisites"
                    ),
                ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(json: &str) -> Vec<Problem> {
        match FlagsConfig::from_json(json.as_bytes()) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let c = FlagsConfig::from_json(br#"{"f": {}}"#).unwrap();
        let f = c.get("f").unwrap();
        assert!(!f.enabled);
        assert_eq!(f.rollout_percentage.get(), 100);
        assert_eq!(f.environments, None);
        assert_eq!(f.stickiness, "session_id");
        assert!(f.conditions.is_empty() && f.salt.is_none() && f.schedule.is_none());
    }

    #[test]
    fn reports_every_problem_with_flag_path_and_position() {
        let p = problems(
            r#"{
  "a": {"enabled": "yes", "rollout_percentage": 101},
  "b": {"conditions": [{"attribute": "x", "op": "regex", "values": ["."]}, {"tier": "gold"}],
        "schedule": [{"at": "2026-02-10T00:00:00Z"}, {"at": "2026-02-09"}]},
  "a": {}
}"#,
        );
        let summary: Vec<(Option<&str>, &str, u32)> = p
            .iter()
            .map(|p| (p.flag.as_deref(), p.path.as_str(), p.line.unwrap()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("a"), "$.a", 5),
                (Some("a"), "$.a.enabled", 2),
                (Some("a"), "$.a.rollout_percentage", 2),
                (Some("b"), "$.b.conditions[0].op", 3),
                (Some("b"), "$.b.conditions[1].tier", 3),
                (Some("b"), "$.b.schedule[1].at", 4),
            ]
        );
        assert!(p[3].message.contains("semver_gte"), "{}", p[3].message);
    }

    #[test]
    fn the_reference_config_is_valid() {
        let text = include_str!("../../tests/fixtures/flags/reference_config.json");
        let c = FlagsConfig::from_json(text.as_bytes()).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c.get("mcp_tasks").unwrap().phase(), Some(2));
    }

    #[test]
    fn serialization_round_trips() {
        let text = r#"{"f": {"enabled": true, "rollout_percentage": 5, "environments": ["dev"],
            "conditions": [{"user_id": "u"}, {"custom": "beta"}, {"attribute": "v", "op": "semver_gte", "values": ["1.2.3"]},
                           {"attribute": "n", "op": "in", "values": ["a", 7]}, {"attribute": "t", "op": "lt", "values": [2.5]}],
            "metadata": {"phase": 2, "x": [1, {"y": null}]}, "stickiness": "user_id", "salt": "s1",
            "schedule": [{"at": "2026-02-09T00:00:00Z", "rollout_percentage": 10}, {"at": "2026-02-16", "environments": []}]}}"#;
        let c = FlagsConfig::from_json(text.as_bytes()).unwrap();
        let again = FlagsConfig::from_json(c.to_json_pretty().as_bytes()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn wrong_shapes_name_what_was_expected() {
        let p = problems(
            r#"{"f": {"conditions": [{"attribute": "v", "op": "lt", "values": [1, 2]}, {"attribute": "v", "op": "semver_lt", "values": ["x"]}, {"op": "in"}], "metadata": {"phase": 5}, "environments": ["a", "a", 3]}}"#,
        );
        let msgs: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(p.len(), 6, "{msgs:#?}");
        assert!(msgs[0].contains("exactly one value"));
        assert!(msgs[1].contains("not a semantic version"));
        assert!(msgs[2].contains("missing attribute, values"));
        assert!(msgs[3].contains("phase"));
        assert!(msgs[4].contains("listed twice"));
        assert!(msgs[5].contains("expected a string, got a number"));
        assert_eq!(
            problems("[]")[0].message,
            "expected an object mapping flag names to flags, got an array"
        );
    }
}
