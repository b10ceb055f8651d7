//! The typed model of a flag config: every value here passed validation.

use std::fmt;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use time::OffsetDateTime;

use crate::time_text::format_time;

/// One flag as written in the config.
#[derive(Clone, Debug, PartialEq)]
pub struct FlagSpec {
    /// Master switch (default `false`).
    pub enabled: bool,
    /// Share of stickiness buckets that get the flag (default 100):
    /// `phash2(Value, 100) < P`. Unused when `rollout_basis_points` is set.
    pub rollout_percentage: Percentage,
    /// The finer rollout, replacing `rollout_percentage` when set:
    /// `phash2(Value, 10000) < BP` (hash contract v1, see [`crate::flags::phash2`]).
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
    /// Which hash contract places a stickiness value in a percentage bucket
    /// (default [`Bucketing::V1`]).
    pub bucketing: Bucketing,
}

/// The hash contract of a flag's percentage rollout (docs/flags.md).
///
/// Cohorts are part of the product: switching a flag's contract re-draws its
/// cohort, so each is fixed and versioned. `Erlmcp` exists so that a config
/// written for erlmcp's own `erlmcp_feature_flags` (its `{"flags": [...]}`
/// format) keeps every session in the cohort that module put it in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bucketing {
    /// Version 1: in when `erlang:phash2(Value, 100) < P` (salted:
    /// `erlang:phash2({Salt, Value}, 100)`).
    #[default]
    V1,
    /// erlmcp's module: in when `erlang:phash2(Value) rem 100 < P`, the
    /// 27-bit `phash2/1` (a different bucket than `phash2(Value, 100)` for
    /// most values). No salt, basis points or variants.
    Erlmcp,
}

impl Bucketing {
    /// The config spelling (`"v1"`, `"erlmcp"`).
    pub fn name(self) -> &'static str {
        match self {
            Bucketing::V1 => "v1",
            Bucketing::Erlmcp => "erlmcp",
        }
    }
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
        if self.bucketing != Bucketing::V1 {
            m.serialize_entry("bucketing", self.bucketing.name())?;
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
            bucketing: Bucketing::V1,
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
