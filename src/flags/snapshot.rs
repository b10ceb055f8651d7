//! The compiled, immutable snapshot that evaluation reads (DESIGN §3.2), and
//! `explain`.
//!
//! Compilation turns the JSON model into what evaluation needs and nothing
//! else: the environment check and each schedule stage pre-decided for this
//! engine's environment, stages as epoch milliseconds, condition operands as
//! byte strings, hash sets and parsed versions, custom predicates resolved,
//! overrides folded in. Evaluation is then a hash lookup and a few branches:
//! no lock, no allocation (except parsing a context's semver pre-release
//! longer than 8 bytes).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use super::config::{Bucketing, Condition, FlagSpec, FlagsConfig, Literal, Number, Operator, Requirement};
use super::details::{resolution_reason, ErrorCode, EvaluationDetails, ResolutionReason};
use super::metrics::FlagCounters;
use super::overrides::{Override, Overrides};
use super::phash2;
use super::table::{same_bytes, FlagId, FlagTable};
use super::value::{Context, Value};
use crate::clock::{unix_ms, Clock};

/// A predicate registered for `{"custom": NAME}` conditions.
pub type CustomPredicate = Arc<dyn Fn(&dyn Context) -> bool + Send + Sync>;

/// The outcome of one evaluation: the value and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    /// Whether the flag is on for this context.
    pub enabled: bool,
    /// Why.
    pub reason: Reason,
}

/// Why an evaluation came out as it did (DESIGN §3.2 steps 1, 4-8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// The config has no such flag.
    UnknownFlag,
    /// `enabled` (after overrides and schedule) is false.
    Disabled,
    /// This environment is not in the flag's `environments`.
    Environment,
    /// The stickiness value's bucket is not below the percentage.
    Rollout {
        /// `phash2(Value, 100)` (or salted).
        bucket: u8,
        /// The percentage in force.
        percentage: u8,
    },
    /// The stickiness value's fine bucket is not below the basis points
    /// (`rollout_basis_points`).
    FineRollout {
        /// `phash2(Value, 10000)` (or salted).
        bucket: u16,
        /// The basis points in force.
        basis_points: u16,
    },
    /// A prerequisite flag is not in the required state.
    Prerequisite {
        /// Its index in `prerequisites`.
        index: u32,
    },
    /// A condition did not hold.
    Condition {
        /// Its index in `conditions`.
        index: u32,
        /// How it failed.
        failure: ConditionFailure,
    },
    /// Every check passed.
    Enabled,
}

impl Reason {
    /// The short code: `unknown_flag`, `disabled`, `environment`,
    /// `prerequisite`, `rollout`, `condition` or `enabled`.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::UnknownFlag => "unknown_flag",
            Reason::Disabled => "disabled",
            Reason::Environment => "environment",
            Reason::Rollout { .. } | Reason::FineRollout { .. } => "rollout",
            Reason::Prerequisite { .. } => "prerequisite",
            Reason::Condition { .. } => "condition",
            Reason::Enabled => "enabled",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Rollout { bucket, percentage } => {
                write!(f, "rollout (bucket {bucket} is not below {percentage}%)")
            }
            Reason::FineRollout { bucket, basis_points } => {
                write!(
                    f,
                    "rollout (fine bucket {bucket} is not below {basis_points} basis points)"
                )
            }
            Reason::Prerequisite { index } => write!(f, "prerequisite (#{index} not met)"),
            Reason::Condition { index, failure } => write!(f, "condition (#{index}: {failure})"),
            other => f.write_str(other.code()),
        }
    }
}

/// How a condition failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionFailure {
    /// The value did not match.
    NotMet,
    /// The context lacks the attribute.
    MissingAttribute,
    /// The value has the wrong type for the operator (e.g. `lt` on an atom).
    WrongType,
    /// No predicate is registered under the custom condition's name.
    Unregistered,
}

impl fmt::Display for ConditionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConditionFailure::NotMet => "not met",
            ConditionFailure::MissingAttribute => "attribute missing from the context",
            ConditionFailure::WrongType => "value has the wrong type for the operator",
            ConditionFailure::Unregistered => "no custom condition registered under this name",
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Rule {
    enabled: bool,
    percentage: u8,
    env_allowed: bool,
}

enum Cond {
    Equals {
        attribute: Arc<str>,
        value: Box<[u8]>,
    },
    Custom {
        name: Box<str>,
        predicate: Option<CustomPredicate>,
    },
    In {
        attribute: Arc<str>,
        texts: FxHashSet<Box<[u8]>>,
        ints: Box<[i64]>,
        negate: bool,
    },
    Text {
        attribute: Arc<str>,
        kind: TextOp,
        needles: Box<[Box<[u8]>]>,
    },
    Number {
        attribute: Arc<str>,
        op: CmpOp,
        operand: Number,
    },
    Semver {
        attribute: Arc<str>,
        lt: bool,
        version: semver::Version,
    },
}

#[derive(Clone, Copy)]
enum TextOp {
    Prefix,
    Suffix,
    Contains,
}

#[derive(Clone, Copy)]
enum CmpOp {
    Lt,
    Lte,
    Gt,
    Gte,
}

/// erlmcp's bucket, `erlang:phash2(Value) rem 100`. Out of line, so that the
/// hash contract v1's inlined path is what it was before this contract existed.
#[inline(never)]
fn erlmcp_bucket(value: Value<'_>) -> u32 {
    match value {
        Value::Foreign(f) => f.phash2_27() % 100,
        // phash2/1 keeps the low 27 bits: phash2(V, 2^27) is the same number.
        _ => phash2::phash2(&value, 1 << 27) % 100,
    }
}

pub(crate) struct CompiledFlag {
    base: Rule,
    stages: Box<[(i64, Rule)]>,
    stickiness: Arc<str>,
    /// When set, buckets are `phash2({Salt, Value}, 100)` (contract v1).
    salt: Option<Box<[u8]>>,
    /// erlmcp's contract ([`Bucketing::Erlmcp`]): `phash2(Value) rem 100`.
    erlmcp: bool,
    conditions: Box<[Cond]>,
    overridden: Option<Override>,
    /// Custom conditions without a Rust predicate (answered by the context),
    /// this flag's and its prerequisites' (transitively).
    external_customs: Box<[Box<str>]>,
    pub(crate) counters: Arc<FlagCounters>,
    /// Basis-point rollouts, prerequisites and variants; `None` for a flag
    /// that has none of them. Never read on the inlined path: a flag with
    /// basis points or prerequisites has [`EXT_PERCENTAGE`] in every rule,
    /// which sends its boolean evaluation out of line
    /// ([`CompiledFlag::evaluate_full`]) from the percentage compare the
    /// inlined path makes anyway.
    ext: Option<Box<Ext>>,
}

/// The `Rule::percentage` of a flag evaluated out of line (its real
/// percentages are in [`Ext::percentages`]).
const EXT_PERCENTAGE: u8 = u8::MAX;

struct Ext {
    /// The real percentage of the base rule (index 0) and of stage `i`
    /// (index `i + 1`) of a flag whose rules hold [`EXT_PERCENTAGE`].
    percentages: Box<[u8]>,
    /// Variants; read only by `details` and by prerequisites on a variant,
    /// never by the boolean evaluation of this flag.
    variants: Option<CompiledVariants>,
    /// Basis points in force for the base rule (index 0) and for stage
    /// `i` (index `i + 1`); `None` = the rule's percentage applies.
    fine: Box<[Option<u16>]>,
    prerequisites: Box<[CompiledPrerequisite]>,
}

struct CompiledPrerequisite {
    /// `None` when the parent is not in the config (only possible for a
    /// config built in code): never met.
    parent: Option<FlagId>,
    want: Want,
}

#[derive(Clone, Copy)]
enum Want {
    On,
    Off,
    /// The parent's variant index.
    Variant(usize),
}

struct CompiledVariants {
    names: Box<[Box<str>]>,
    weights: Box<[u32]>,
    /// How many have a weight above 0 (1 = no split: that one always).
    positive: usize,
}

/// What an evaluation observed besides its outcome (for `details`).
#[derive(Default, Clone, Copy)]
struct Trace {
    /// A stickiness value was needed (rollout, variant split) and absent,
    /// so `<<>>` was hashed.
    key_missing: bool,
    /// A rollout below 100 % or a variant split placed the value.
    split: bool,
}

/// An immutable compiled config for one environment, with overrides and
/// custom predicates folded in. Cheap to share; obtained from
/// [`super::Engine::snapshot`].
pub struct Snapshot {
    flags: FlagTable<CompiledFlag>,
    environment: Box<str>,
    config: Arc<FlagsConfig>,
    overrides: Overrides,
    generation: u64,
    clock: Arc<dyn Clock>,
    pub(crate) unknown: Arc<FlagCounters>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("environment", &self.environment)
            .field("flags", &self.flags.len())
            .field("generation", &self.generation)
            .finish()
    }
}

/// Everything compilation needs besides the config.
pub(crate) struct CompileInput<'a> {
    pub config: Arc<FlagsConfig>,
    pub environment: &'a str,
    pub overrides: &'a Overrides,
    pub customs: &'a BTreeMap<String, CustomPredicate>,
    pub counters: &'a mut BTreeMap<String, Arc<FlagCounters>>,
    pub unknown: Arc<FlagCounters>,
    pub clock: Arc<dyn Clock>,
    pub generation: u64,
}

fn env_allowed(envs: Option<&Vec<String>>, environment: &str) -> bool {
    envs.is_none_or(|list| list.iter().any(|e| e == environment))
}

fn bytes(s: &str) -> Box<[u8]> {
    s.as_bytes().into()
}

/// One shared allocation per distinct context key in a snapshot, so that
/// adapters can recognize a key by its address ([`Snapshot::context_keys`]
/// returns these same strings).
#[derive(Default)]
struct Interner(FxHashMap<Box<str>, Arc<str>>);

impl Interner {
    fn get(&mut self, key: &str) -> Arc<str> {
        if let Some(k) = self.0.get(key) {
            return k.clone();
        }
        let k: Arc<str> = Arc::from(key);
        self.0.insert(key.into(), k.clone());
        k
    }
}

fn compile_condition(c: &Condition, customs: &BTreeMap<String, CustomPredicate>, keys: &mut Interner) -> Cond {
    match c {
        Condition::Equals { attribute, value } => Cond::Equals {
            attribute: keys.get(attribute),
            value: bytes(value),
        },
        Condition::Custom { name } => Cond::Custom {
            name: name.as_str().into(),
            predicate: customs.get(name).cloned(),
        },
        Condition::Match { attribute, op } => {
            let attribute = keys.get(attribute);
            let text = |kind, v: &Vec<String>| Cond::Text {
                attribute: attribute.clone(),
                kind,
                needles: v.iter().map(|s| bytes(s)).collect(),
            };
            let set = |v: &Vec<Literal>, negate| Cond::In {
                attribute: attribute.clone(),
                texts: v
                    .iter()
                    .filter_map(|l| match l {
                        Literal::Str(s) => Some(bytes(s)),
                        Literal::Int(_) => None,
                    })
                    .collect(),
                ints: v
                    .iter()
                    .filter_map(|l| match l {
                        Literal::Int(i) => Some(*i),
                        Literal::Str(_) => None,
                    })
                    .collect(),
                negate,
            };
            let num = |op, operand| Cond::Number {
                attribute: attribute.clone(),
                op,
                operand,
            };
            match op {
                Operator::In(v) => set(v, false),
                Operator::NotIn(v) => set(v, true),
                Operator::Prefix(v) => text(TextOp::Prefix, v),
                Operator::Suffix(v) => text(TextOp::Suffix, v),
                Operator::Contains(v) => text(TextOp::Contains, v),
                Operator::Lt(n) => num(CmpOp::Lt, *n),
                Operator::Lte(n) => num(CmpOp::Lte, *n),
                Operator::Gt(n) => num(CmpOp::Gt, *n),
                Operator::Gte(n) => num(CmpOp::Gte, *n),
                Operator::SemverLt(v) => Cond::Semver {
                    attribute,
                    lt: true,
                    version: v.clone(),
                },
                Operator::SemverGte(v) => Cond::Semver {
                    attribute,
                    lt: false,
                    version: v.clone(),
                },
            }
        }
    }
}

/// The custom conditions without a Rust predicate of `name` and of its
/// prerequisites, transitively, in first-seen order without repeats.
fn external_customs_of(
    name: &str,
    config: &FlagsConfig,
    customs: &BTreeMap<String, CustomPredicate>,
    out: &mut Vec<Box<str>>,
    depth: usize,
) {
    let Some(spec) = config.get(name) else { return };
    for c in &spec.conditions {
        if let Condition::Custom { name } = c {
            if !customs.contains_key(name) && !out.iter().any(|n| **n == **name) {
                out.push(name.as_str().into());
            }
        }
    }
    if depth < super::config::MAX_PREREQUISITE_DEPTH {
        for q in &spec.prerequisites {
            external_customs_of(&q.flag, config, customs, out, depth + 1);
        }
    }
}

impl CompiledFlag {
    fn compile(
        name: &str,
        spec: &FlagSpec,
        input: &mut CompileInput<'_>,
        keys: &mut Interner,
        ids: &BTreeMap<&str, usize>,
    ) -> CompiledFlag {
        let base = Rule {
            enabled: spec.enabled,
            percentage: spec.rollout_percentage.get(),
            env_allowed: env_allowed(spec.environments.as_ref(), input.environment),
        };
        let stages = spec
            .schedule
            .as_ref()
            .map(|s| {
                s.stages()
                    .iter()
                    .map(|st| {
                        let rule = Rule {
                            enabled: st.enabled.unwrap_or(base.enabled),
                            percentage: st.rollout_percentage.map_or(base.percentage, |p| p.get()),
                            env_allowed: match &st.environments {
                                Some(envs) => env_allowed(Some(envs), input.environment),
                                None => base.env_allowed,
                            },
                        };
                        (unix_ms(st.at), rule)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let counters = input.counters.entry(name.to_owned()).or_default().clone();
        let conditions: Box<[Cond]> = spec
            .conditions
            .iter()
            .map(|c| compile_condition(c, input.customs, keys))
            .collect();
        let mut external_customs: Vec<Box<str>> = Vec::new();
        external_customs_of(name, &input.config, input.customs, &mut external_customs, 0);
        let fine_base = spec.rollout_basis_points.map(|b| b.get());
        let mut fine = vec![fine_base];
        if let Some(s) = &spec.schedule {
            fine.extend(
                s.stages()
                    .iter()
                    .map(|st| match (st.rollout_basis_points, st.rollout_percentage) {
                        (Some(bp), _) => Some(bp.get()),
                        (None, Some(_)) => None,
                        (None, None) => fine_base,
                    }),
            );
        }
        let prerequisites: Box<[CompiledPrerequisite]> = spec
            .prerequisites
            .iter()
            .map(|q| {
                let parent = ids.get(q.flag.as_str()).copied();
                let want = match &q.requirement {
                    Requirement::On => Want::On,
                    Requirement::Off => Want::Off,
                    Requirement::Variant(v) => {
                        match input
                            .config
                            .get(&q.flag)
                            .and_then(|p| p.variants.as_ref())
                            .and_then(|vs| vs.iter().position(|x| x.name == *v))
                        {
                            Some(i) => Want::Variant(i),
                            // No such variant (a config built in code): never met.
                            None => Want::Variant(usize::MAX),
                        }
                    }
                };
                CompiledPrerequisite {
                    parent: parent.and_then(FlagId::from_index),
                    want,
                }
            })
            .collect();
        let variants = spec.variants.as_ref().map(|vs| CompiledVariants {
            names: vs.iter().map(|v| Box::from(v.name.as_str())).collect(),
            weights: vs.iter().map(|v| v.weight).collect(),
            positive: vs.iter().filter(|v| v.weight > 0).count(),
        });
        let out_of_line = fine.iter().any(Option::is_some) || !prerequisites.is_empty();
        let mut base = base;
        let mut stages: Box<[(i64, Rule)]> = stages;
        let mut percentages = Vec::new();
        if out_of_line {
            percentages.push(base.percentage);
            base.percentage = EXT_PERCENTAGE;
            for (_, r) in stages.iter_mut() {
                percentages.push(r.percentage);
                r.percentage = EXT_PERCENTAGE;
            }
        }
        let ext = (out_of_line || variants.is_some()).then(|| {
            Box::new(Ext {
                percentages: percentages.into(),
                variants,
                fine: fine.into(),
                prerequisites,
            })
        });
        CompiledFlag {
            ext,
            external_customs: external_customs.into(),
            base,
            stages,
            stickiness: keys.get(&spec.stickiness),
            salt: spec.salt.as_deref().map(bytes),
            erlmcp: spec.bucketing == Bucketing::Erlmcp,
            conditions,
            overridden: input.overrides.lookup(name),
            counters,
        }
    }

    /// The rule in force at `now_ms` and the index of its stage. Returns a
    /// reference, never a copy: the hot path must not write a `Rule` to
    /// memory field by field and read it back whole (BENCHMARKS.md, issue 3).
    #[inline(always)]
    fn rule_at(&self, now_ms: i64) -> (&Rule, Option<usize>) {
        let n = self.stages.partition_point(|(at, _)| *at <= now_ms);
        match n
            .checked_sub(1)
            .and_then(|i| self.stages.get(i).map(|(_, r)| (r, Some(i))))
        {
            Some(found) => found,
            None => (&self.base, None),
        }
    }

    /// The rule in force now (no clock read without stages).
    #[inline(always)]
    fn rule(&self, clock: &dyn Clock) -> &Rule {
        if self.stages.is_empty() {
            &self.base
        } else {
            self.rule_at(clock.now_unix_ms()).0
        }
    }

    // Must stay inlined together with the hash: the `Value` it builds is
    // consumed in registers, never passed to `phash2` through memory
    // (BENCHMARKS.md, issue 3: the rollout path).
    #[inline(always)]
    fn bucket<C: Context>(&self, ctx: &C) -> u8 {
        let value = ctx.get(&self.stickiness).unwrap_or(Value::Binary(b""));
        let b = if self.erlmcp {
            erlmcp_bucket(value)
        } else {
            match &self.salt {
                Some(salt) => phash2::phash2_salted(salt, &value, 100),
                None => phash2::phash2(&value, 100),
            }
        };
        // phash2(_, 100) < 100.
        u8::try_from(b).unwrap_or(u8::MAX)
    }

    // Must stay inlined: the `Evaluation` is built in the caller's
    // registers, never returned through memory (BENCHMARKS.md, issue 3:
    // the static path).
    #[inline(always)]
    fn evaluate<C: Context>(&self, ctx: &C, clock: &dyn Clock, flags: &FlagTable<CompiledFlag>) -> Evaluation {
        let rule = self.rule(clock);
        let enabled = self.overridden.map_or(rule.enabled, |o| o.enabled);
        let reason = self.decide(enabled, rule, ctx, clock, flags);
        Evaluation {
            enabled: matches!(reason, Reason::Enabled),
            reason,
        }
    }

    #[inline(always)]
    fn decide<C: Context>(
        &self,
        enabled: bool,
        rule: &Rule,
        ctx: &C,
        clock: &dyn Clock,
        flags: &FlagTable<CompiledFlag>,
    ) -> Reason {
        if !enabled {
            return Reason::Disabled;
        }
        if !rule.env_allowed {
            return Reason::Environment;
        }
        if rule.percentage < 100 {
            let bucket = self.bucket(ctx);
            if bucket >= rule.percentage {
                return Reason::Rollout {
                    bucket,
                    percentage: rule.percentage,
                };
            }
        } else if rule.percentage == EXT_PERCENTAGE {
            return self.decide_ext(ctx, clock, flags);
        }
        match self.first_failing_condition(ctx) {
            Some((index, failure)) => Reason::Condition { index, failure },
            None => Reason::Enabled,
        }
    }

    #[inline(never)]
    fn decide_ext<C: Context>(&self, ctx: &C, clock: &dyn Clock, flags: &FlagTable<CompiledFlag>) -> Reason {
        self.evaluate_full(ctx, clock.now_unix_ms(), flags, 0, &mut Trace::default())
    }

    /// The real percentage of `rule` (the rule of `stage`).
    fn percentage_at(&self, stage: Option<usize>, rule: &Rule) -> u8 {
        match &self.ext {
            Some(ext) if rule.percentage == EXT_PERCENTAGE => {
                ext.percentages.get(stage.map_or(0, |i| i + 1)).copied().unwrap_or(100)
            }
            _ => rule.percentage,
        }
    }

    fn variants(&self) -> Option<&CompiledVariants> {
        self.ext.as_ref()?.variants.as_ref()
    }

    /// The whole evaluation order (DESIGN §3.2 with prerequisites and
    /// basis points), for every kind of flag: the out-of-line path, and
    /// `details` / `explain`. For a flag without `ext` it decides exactly as
    /// [`CompiledFlag::decide`] (a unit test holds them together).
    fn evaluate_full<C: Context>(
        &self,
        ctx: &C,
        now_ms: i64,
        flags: &FlagTable<CompiledFlag>,
        depth: usize,
        trace: &mut Trace,
    ) -> Reason {
        let (rule, stage) = self.rule_at(now_ms);
        let enabled = self.overridden.map_or(rule.enabled, |o| o.enabled);
        if !enabled {
            return Reason::Disabled;
        }
        if !rule.env_allowed {
            return Reason::Environment;
        }
        let percentage = self.percentage_at(stage, rule);
        if let Some(ext) = &self.ext {
            for (i, q) in ext.prerequisites.iter().enumerate() {
                if !self.prerequisite_met(q, ctx, now_ms, flags, depth, trace) {
                    return Reason::Prerequisite {
                        index: u32::try_from(i).unwrap_or(u32::MAX),
                    };
                }
            }
        }
        match self.fine_at(stage) {
            Some(bp) if bp < 10_000 => {
                trace.split = true;
                let bucket = self.fine_bucket(ctx, trace);
                if bucket >= bp {
                    return Reason::FineRollout {
                        bucket,
                        basis_points: bp,
                    };
                }
            }
            Some(_) => {}
            None if percentage < 100 => {
                trace.split = true;
                trace.key_missing |= ctx.get(&self.stickiness).is_none();
                let bucket = self.bucket(ctx);
                if bucket >= percentage {
                    return Reason::Rollout { bucket, percentage };
                }
            }
            None => {}
        }
        match self.first_failing_condition(ctx) {
            Some((index, failure)) => Reason::Condition { index, failure },
            None => Reason::Enabled,
        }
    }

    fn prerequisite_met<C: Context>(
        &self,
        q: &CompiledPrerequisite,
        ctx: &C,
        now_ms: i64,
        flags: &FlagTable<CompiledFlag>,
        depth: usize,
        trace: &mut Trace,
    ) -> bool {
        // Validation bounds the depth; a config built in code is cut off here.
        if depth >= super::config::MAX_PREREQUISITE_DEPTH {
            return false;
        }
        let Some(parent) = q.parent.and_then(|id| flags.at(id)) else {
            return false;
        };
        let on = matches!(
            parent.evaluate_full(ctx, now_ms, flags, depth + 1, trace),
            Reason::Enabled
        );
        match q.want {
            Want::On => on,
            Want::Off => !on,
            Want::Variant(v) => on && parent.variant_index(ctx, trace) == Some(v),
        }
    }

    /// Basis points in force for the rule of `stage` (`None` = base).
    fn fine_at(&self, stage: Option<usize>) -> Option<u16> {
        let ext = self.ext.as_ref()?;
        let i = stage.map_or(0, |i| i + 1);
        ext.fine.get(i).copied().flatten()
    }

    /// `phash2(Value, 10000)` (salted: `phash2({Salt, Value}, 10000)`).
    fn fine_bucket<C: Context>(&self, ctx: &C, trace: &mut Trace) -> u16 {
        let value = ctx.get(&self.stickiness);
        trace.key_missing |= value.is_none();
        let value = value.unwrap_or(Value::Binary(b""));
        // Validation keeps basis points and variants away from erlmcp's contract.
        let b = match &self.salt {
            Some(salt) => phash2::phash2_salted(salt, &value, 10_000),
            None => phash2::phash2(&value, 10_000),
        };
        u16::try_from(b).unwrap_or(u16::MAX)
    }

    /// The variant an enabled flag serves to `ctx` (weighted rendezvous on
    /// the fine bucket; see [`super::config::Variants`]). `None` without variants.
    fn variant_index<C: Context>(&self, ctx: &C, trace: &mut Trace) -> Option<usize> {
        let v = self.variants()?;
        if v.positive == 1 {
            return v.weights.iter().position(|w| *w > 0);
        }
        trace.split = true;
        let bucket = i64::from(self.fine_bucket(ctx, trace));
        let mut best: Option<(f64, usize)> = None;
        for (i, (name, w)) in v.names.iter().zip(v.weights.iter()).enumerate() {
            if *w == 0 {
                continue;
            }
            let h = phash2::hash_salted(name.as_bytes(), &Value::Int(bucket));
            let u = (f64::from(h) + 0.5) / 4_294_967_296.0;
            let score = -u.ln() / f64::from(*w);
            // Ties (practically never) go to the smaller name: independent
            // of the order variants are listed in.
            let better = match best {
                None => true,
                Some((s, j)) => score < s || (score == s && v.names.get(j).is_some_and(|n| name < n)),
            };
            if better {
                best = Some((score, i));
            }
        }
        best.map(|(_, i)| i)
    }

    fn first_failing_condition<C: Context>(&self, ctx: &C) -> Option<(u32, ConditionFailure)> {
        for (i, c) in self.conditions.iter().enumerate() {
            if let Err(f) = check(c, ctx) {
                return Some((u32::try_from(i).unwrap_or(u32::MAX), f));
            }
        }
        None
    }
}

fn attribute_of(c: &Cond) -> Option<&str> {
    match c {
        Cond::Equals { attribute, .. }
        | Cond::In { attribute, .. }
        | Cond::Text { attribute, .. }
        | Cond::Number { attribute, .. }
        | Cond::Semver { attribute, .. } => Some(attribute),
        Cond::Custom { .. } => None,
    }
}

#[inline(always)]
fn check<C: Context>(c: &Cond, ctx: &C) -> Result<(), ConditionFailure> {
    use ConditionFailure::{MissingAttribute, NotMet, Unregistered, WrongType};
    let ok = |b: bool| if b { Ok(()) } else { Err(NotMet) };
    if let Cond::Custom { predicate, name } = c {
        return match predicate {
            Some(p) => ok(p(ctx as &dyn Context)),
            None => ctx.custom(name).map_or(Err(Unregistered), ok),
        };
    }
    // The most common condition on its own path: the value is matched where
    // it is made, so it stays in registers (the general match below spills
    // it; BENCHMARKS.md, issue 3: the condition path).
    if let Cond::Equals {
        attribute,
        value: expected,
    } = c
    {
        return match ctx.get(attribute) {
            None => Err(MissingAttribute),
            Some(Value::Binary(b)) => ok(same_bytes(b, expected)),
            Some(Value::Atom(a)) => ok(same_bytes(a.as_bytes(), expected)),
            Some(Value::Int(_) | Value::BigInt { .. } | Value::Foreign(_)) => Err(NotMet),
        };
    }
    let Some(attr) = attribute_of(c) else {
        return Err(NotMet);
    };
    let Some(value) = ctx.get(attr) else {
        return Err(MissingAttribute);
    };
    match c {
        Cond::Equals { value: expected, .. } => ok(value.text() == Some(expected)),
        Cond::In {
            texts, ints, negate, ..
        } => {
            let found = match value {
                Value::Int(i) => ints.contains(&i),
                Value::BigInt { .. } | Value::Foreign(_) => false,
                Value::Binary(b) => texts.contains(b),
                Value::Atom(a) => texts.contains(a.as_bytes()),
            };
            ok(found != *negate)
        }
        Cond::Text { kind, needles, .. } => {
            let text = value.text().ok_or(WrongType)?;
            ok(needles.iter().any(|n| match kind {
                TextOp::Prefix => text.starts_with(n),
                TextOp::Suffix => text.ends_with(n),
                TextOp::Contains => n.is_empty() || text.windows(n.len()).any(|w| w == &**n),
            }))
        }
        Cond::Number { op, operand, .. } => {
            let ord = compare_number(&value, *operand).ok_or(WrongType)?;
            ok(match op {
                CmpOp::Lt => ord == Ordering::Less,
                CmpOp::Lte => ord != Ordering::Greater,
                CmpOp::Gt => ord == Ordering::Greater,
                CmpOp::Gte => ord != Ordering::Less,
            })
        }
        Cond::Semver { lt, version, .. } => {
            let text = value
                .text()
                .and_then(|t| std::str::from_utf8(t).ok())
                .ok_or(WrongType)?;
            let text = text.strip_prefix('v').unwrap_or(text);
            let v = semver::Version::parse(text).map_err(|_| WrongType)?;
            ok((v < *version) == *lt)
        }
        Cond::Custom { .. } => Err(NotMet),
    }
}

/// Compare a context value with a numeric operand; `None` if the value is
/// not a number (binaries are parsed as decimal text).
fn compare_number(value: &Value<'_>, operand: Number) -> Option<Ordering> {
    match value {
        Value::Int(i) => Some(cmp_int(*i, operand)),
        Value::BigInt { negative, magnitude } => {
            if magnitude.iter().all(|b| *b == 0) {
                return Some(cmp_int(0, operand));
            }
            // Beyond i64 (if it fitted it would be an Int); approximate via f64.
            let mut f = 0f64;
            for b in magnitude.iter().rev() {
                f = f * 256.0 + f64::from(*b);
            }
            let f = if *negative { -f } else { f };
            let o = match operand {
                Number::Int(n) => n as f64,
                Number::Float(x) => x,
            };
            f.partial_cmp(&o)
        }
        Value::Binary(b) => {
            let s = std::str::from_utf8(b).ok()?.trim();
            if let Ok(i) = s.parse::<i64>() {
                return Some(cmp_int(i, operand));
            }
            let f: f64 = s.parse().ok()?;
            if !f.is_finite() {
                return None;
            }
            match operand {
                Number::Int(n) => cmp_int(n, Number::Float(f)).reverse().into(),
                Number::Float(x) => f.partial_cmp(&x),
            }
        }
        Value::Atom(_) | Value::Foreign(_) => None,
    }
}

/// Exact comparison of an integer with an integer or a finite float.
fn cmp_int(i: i64, operand: Number) -> Ordering {
    match operand {
        Number::Int(n) => i.cmp(&n),
        Number::Float(x) => {
            const TWO_63: f64 = 9_223_372_036_854_775_808.0;
            let fl = x.floor();
            if fl >= TWO_63 {
                return Ordering::Less;
            }
            if fl < -TWO_63 {
                return Ordering::Greater;
            }
            let fl_i = fl as i64; // exact: fl is integral and in range
            match i.cmp(&fl_i) {
                Ordering::Equal if x > fl => Ordering::Less,
                o => o,
            }
        }
    }
}

impl Snapshot {
    pub(crate) fn compile(mut input: CompileInput<'_>) -> Snapshot {
        let config = input.config.clone();
        let mut keys = Interner::default();
        // Ids are positions in config order (what `FlagTable::new` assigns).
        let ids: BTreeMap<&str, usize> = config.iter().enumerate().map(|(i, (n, _))| (n, i)).collect();
        let flags = FlagTable::new(
            config
                .iter()
                .map(|(name, spec)| {
                    (
                        bytes(name),
                        CompiledFlag::compile(name, spec, &mut input, &mut keys, &ids),
                    )
                })
                .collect(),
        );
        Snapshot {
            flags,
            environment: input.environment.into(),
            config,
            overrides: input.overrides.clone(),
            generation: input.generation,
            clock: input.clock,
            unknown: input.unknown,
        }
    }

    /// Evaluate `name` (bytes of a binary or atom name) for `ctx`, counting
    /// the result. Never fails: an unknown flag is `false` with reason
    /// [`Reason::UnknownFlag`].
    #[inline]
    pub fn evaluate<C: Context>(&self, name: &[u8], ctx: &C) -> Evaluation {
        self.evaluate_id(self.flags.find(name), ctx)
    }

    /// [`Snapshot::evaluate`] for a flag found by [`Snapshot::flag_id`] on
    /// this snapshot; `None` is an unknown flag.
    #[inline]
    pub fn evaluate_id<C: Context>(&self, id: Option<FlagId>, ctx: &C) -> Evaluation {
        match id.and_then(|id| self.flags.at(id)) {
            Some(flag) => {
                let e = flag.evaluate(ctx, &*self.clock, &self.flags);
                // An incomplete context gave a placeholder (see Context::complete).
                if ctx.complete() {
                    flag.counters.record(e.enabled);
                }
                e
            }
            None => {
                self.unknown.record(false);
                Evaluation {
                    enabled: false,
                    reason: Reason::UnknownFlag,
                }
            }
        }
    }

    /// Like [`Snapshot::evaluate`], but when the flag has custom conditions
    /// without a Rust predicate, return their names instead of evaluating
    /// (nothing is counted then): the caller gets the answers (the NIF runs
    /// the registered Erlang funs) and evaluates again with a context whose
    /// [`Context::custom`] supplies them. One hash lookup either way.
    #[inline]
    pub fn evaluate_or_defer<C: Context>(&self, name: &[u8], ctx: &C) -> Deferred<'_> {
        self.evaluate_or_defer_id(self.flags.find(name), ctx)
    }

    /// The id of flag `name` in this snapshot, for adapters that resolve
    /// names once (the NIF maps atom names to ids per published snapshot).
    #[inline]
    pub fn flag_id(&self, name: &[u8]) -> Option<FlagId> {
        self.flags.find(name)
    }

    /// [`Snapshot::evaluate_or_defer`] for a flag found by
    /// [`Snapshot::flag_id`] on this snapshot; `None` is an unknown flag
    /// (counted as one).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{Deferred, Engine, FlagsConfig};
    /// let engine = Engine::builder().build(FlagsConfig::from_json(br#"{"f": {"enabled": true}}"#).unwrap());
    /// let snap = engine.snapshot();
    /// let id = snap.flag_id(b"f");
    /// assert!(matches!(snap.evaluate_or_defer_id(id, &()), Deferred::Evaluated(e) if e.enabled));
    /// assert!(matches!(snap.evaluate_or_defer_id(None, &()), Deferred::Evaluated(e) if !e.enabled));
    /// ```
    #[inline(always)]
    pub fn evaluate_or_defer_id<C: Context>(&self, id: Option<FlagId>, ctx: &C) -> Deferred<'_> {
        match id.and_then(|id| self.flags.at(id)) {
            Some(flag) if !flag.external_customs.is_empty() => Deferred::NeedsCustom(&flag.external_customs),
            Some(flag) => {
                let e = flag.evaluate(ctx, &*self.clock, &self.flags);
                if !ctx.complete() {
                    return Deferred::NeedsHashes;
                }
                flag.counters.record(e.enabled);
                Deferred::Evaluated(e)
            }
            None => {
                self.unknown.record(false);
                Deferred::Evaluated(Evaluation {
                    enabled: false,
                    reason: Reason::UnknownFlag,
                })
            }
        }
    }

    /// Count one evaluation of a name the config does not have, for an
    /// adapter that recognized the name as unknown without evaluating (the
    /// NIF, for an atom that names no flag).
    #[inline]
    pub fn count_unknown(&self) {
        self.unknown.record(false);
    }

    /// The environment this snapshot was compiled for.
    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// The config it was compiled from.
    pub fn config(&self) -> &FlagsConfig {
        &self.config
    }

    /// Increases with every published snapshot of an engine.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every context key some flag reads (stickiness keys and condition
    /// attributes), sorted and deduplicated: what an adapter must be able to
    /// look up. Each is the very string (same address) that evaluation later
    /// passes to [`Context::get`], so an adapter may match keys by pointer
    /// first.
    pub fn context_keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .flags
            .values()
            .flat_map(|f| std::iter::once(&*f.stickiness).chain(f.conditions.iter().filter_map(attribute_of)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The stickiness key of flag `id` (the context key its rollout hashes).
    pub fn stickiness_of(&self, id: FlagId) -> Option<&str> {
        self.flags.at(id).map(|f| &*f.stickiness)
    }

    /// The custom conditions of `name` that have no Rust predicate, in
    /// condition order: an adapter answers them through
    /// [`Context::custom`] (the NIF runs the registered Erlang funs).
    /// Empty for unknown flags. Does not allocate.
    pub fn unregistered_conditions(&self, name: &[u8]) -> &[Box<str>] {
        self.flags.get(name).map(|f| &*f.external_customs).unwrap_or_default()
    }

    /// The effective `enabled` of every flag (reference `get_all/0`
    /// semantics): the `enabled` field after the schedule stage in force and
    /// overrides, ignoring environment, rollout and conditions.
    pub fn get_all(&self) -> BTreeMap<String, bool> {
        let now = self.clock.now_unix_ms();
        self.config
            .iter()
            .filter_map(|(name, _)| {
                let f = self.flags.get(name.as_bytes())?;
                let (rule, _) = f.rule_at(now);
                Some((name.to_owned(), f.overridden.map_or(rule.enabled, |o| o.enabled)))
            })
            .collect()
    }

    /// Evaluate `name` for `ctx` with OpenFeature-style details: the value
    /// (the variant's value for a flag with variants), the variant, the
    /// reason, an error code, the flag's metadata. Counted like
    /// [`Snapshot::evaluate`]; `details(..).evaluation` equals its result.
    pub fn details<C: Context>(&self, name: &str, ctx: &C) -> EvaluationDetails {
        let Some(flag) = self.flags.get(name.as_bytes()) else {
            self.unknown.record(false);
            return EvaluationDetails {
                flag: name.to_owned(),
                value: None,
                variant: None,
                reason: ResolutionReason::Error,
                error_code: Some(ErrorCode::FlagNotFound),
                error_message: Some(format!("flag {name:?} is not in the config")),
                metadata: serde_json::Map::new(),
                evaluation: Evaluation {
                    enabled: false,
                    reason: Reason::UnknownFlag,
                },
            };
        };
        let spec = self.config.get(name);
        let mut trace = Trace::default();
        let reason = flag.evaluate_full(ctx, self.clock.now_unix_ms(), &self.flags, 0, &mut trace);
        let enabled = matches!(reason, Reason::Enabled);
        let variant = if enabled {
            flag.variant_index(ctx, &mut trace)
        } else {
            None
        };
        if ctx.complete() {
            flag.counters.record(enabled);
        }
        let variants = spec.and_then(|s| s.variants.as_ref());
        let (value, variant) = match (variants, variant) {
            (Some(vs), Some(i)) => match vs.iter().nth(i) {
                Some(v) => (Some(v.value.clone()), Some(v.name.clone())),
                None => (None, None),
            },
            (Some(_), None) => (None, None),
            (None, _) => (Some(serde_json::Value::Bool(enabled)), None),
        };
        let targeted = spec.is_some_and(|s| !s.conditions.is_empty() || !s.prerequisites.is_empty());
        let details = EvaluationDetails {
            flag: name.to_owned(),
            value,
            variant,
            reason: resolution_reason(reason, trace.split, targeted),
            error_code: None,
            error_message: None,
            metadata: spec.map(|s| s.metadata.clone()).unwrap_or_default(),
            evaluation: Evaluation { enabled, reason },
        };
        if trace.key_missing {
            let key = spec.map_or(super::config::DEFAULT_STICKINESS, |s| s.stickiness.as_str());
            return details.with_error(
                ErrorCode::TargetingKeyMissing,
                format!(
                    "the context has no {key:?} (the flag's stickiness key), which its rollout or variant split needs"
                ),
            );
        }
        details
    }

    /// Each flag's config, what is in force now, override and counters.
    pub fn all_details(&self) -> Vec<FlagDetails> {
        let now = self.clock.now_unix_ms();
        self.config
            .iter()
            .filter_map(|(name, spec)| {
                let f = self.flags.get(name.as_bytes())?;
                let (rule, stage) = f.rule_at(now);
                Some(FlagDetails {
                    name: name.to_owned(),
                    effective_enabled: f.overridden.map_or(rule.enabled, |o| o.enabled),
                    environment_allowed: rule.env_allowed,
                    rollout_percentage: f.percentage_at(stage, rule),
                    rollout_basis_points: f.fine_at(stage),
                    schedule_stage: stage,
                    r#override: f.overridden,
                    counts: f.counters.read(),
                    config: spec.clone(),
                })
            })
            .collect()
    }

    /// Evaluate with the full reason chain. The result equals
    /// [`Snapshot::evaluate`]'s (and is counted like it).
    pub fn explain<C: Context>(&self, name: &str, ctx: &C) -> Explanation {
        let result = self.evaluate(name.as_bytes(), ctx);
        let mut steps = Vec::new();
        let mut step = |check: &str, passed: Option<bool>, detail: String| {
            steps.push(Step {
                check: check.to_owned(),
                passed,
                detail,
            });
        };
        let (Some(flag), Some(spec)) = (self.flags.get(name.as_bytes()), self.config.get(name)) else {
            let known: Vec<&str> = self.config.iter().map(|(n, _)| n).collect();
            let hint = closest(name, &known)
                .map(|c| format!("; did you mean {c:?}?"))
                .unwrap_or_default();
            step("flag", Some(false), format!("{name:?} is not in the config{hint}"));
            return Explanation {
                flag: name.to_owned(),
                environment: self.environment.to_string(),
                result,
                steps,
            };
        };
        let now = self.clock.now_unix_ms();
        let (rule, stage) = flag.rule_at(now);
        match (stage, spec.schedule.as_ref()) {
            (Some(i), Some(s)) => {
                let at = s
                    .stages()
                    .get(i)
                    .map(|st| super::config::format_time(st.at))
                    .unwrap_or_default();
                step(
                    "schedule",
                    None,
                    format!(
                        "stage [{i}] (since {at}) in force: enabled={}, rollout_percentage={}, environment allowed={}",
                        rule.enabled,
                        flag.percentage_at(stage, rule),
                        rule.env_allowed
                    ),
                );
            }
            (None, Some(s)) => {
                let first = s
                    .stages()
                    .first()
                    .map(|st| super::config::format_time(st.at))
                    .unwrap_or_default();
                step(
                    "schedule",
                    None,
                    format!("before the first stage ({first}): base fields apply"),
                );
            }
            _ => {}
        }
        let enabled = match flag.overridden {
            Some(o) => {
                step(
                    "override",
                    None,
                    format!("{} sets enabled={} (config says {})", o.source, o.enabled, rule.enabled),
                );
                o.enabled
            }
            None => rule.enabled,
        };
        step("enabled", Some(enabled), format!("enabled={enabled}"));
        step(
            "environment",
            Some(rule.env_allowed),
            match (
                &spec.environments,
                stage.and_then(|i| spec.schedule.as_ref()?.stages().get(i)?.environments.as_ref()),
            ) {
                (_, Some(envs)) | (Some(envs), None) => {
                    format!(
                        "{:?} {} in {:?}",
                        &*self.environment,
                        if rule.env_allowed { "is" } else { "is not" },
                        envs
                    )
                }
                (None, None) => "every environment allowed (no environments list)".to_owned(),
            },
        );
        for (i, q) in spec.prerequisites.iter().enumerate() {
            self.explain_prerequisite(&format!("prerequisite[{i}]"), q, ctx, now, 0, &mut step);
        }
        if let Some(bp) = flag.fine_at(stage) {
            let value = ctx.get(&flag.stickiness);
            let shown = match &value {
                Some(v) => format!("{}={v}", flag.stickiness),
                None => format!("{} missing: hashing <<>> as the reference does", flag.stickiness),
            };
            let bucket = flag.fine_bucket(ctx, &mut Trace::default());
            let formula = match &spec.salt {
                Some(s) => format!("phash2({{<<{s:?}>>, Value}}, 10000)"),
                None => "phash2(Value, 10000)".to_owned(),
            };
            let inside = bucket < bp;
            step(
                "rollout",
                Some(inside),
                format!(
                    "{shown}; {formula} = {bucket}, {} {bp} basis points",
                    if inside { "below" } else { "not below" }
                ),
            );
        } else if flag.percentage_at(stage, rule) == 100 {
            step("rollout", Some(true), "rollout_percentage=100: everyone".to_owned());
        } else {
            let value = ctx.get(&flag.stickiness);
            let shown = match &value {
                Some(v) => format!("{}={v}", flag.stickiness),
                None => format!("{} missing: hashing <<>> as the reference does", flag.stickiness),
            };
            let bucket = flag.bucket(ctx);
            let formula = match (&spec.bucketing, &spec.salt) {
                (Bucketing::Erlmcp, _) => "phash2(Value) rem 100".to_owned(),
                (Bucketing::V1, Some(s)) => format!("phash2({{<<{s:?}>>, Value}}, 100)"),
                (Bucketing::V1, None) => "phash2(Value, 100)".to_owned(),
            };
            let percentage = flag.percentage_at(stage, rule);
            let inside = bucket < percentage;
            step(
                "rollout",
                Some(inside),
                format!(
                    "{shown}; {formula} = {bucket}, {} {}%",
                    if inside { "below" } else { "not below" },
                    percentage
                ),
            );
        }
        for (i, (c, cfg)) in flag.conditions.iter().zip(&spec.conditions).enumerate() {
            let r = check(c, ctx);
            let detail = match (r, attribute_of(c).and_then(|a| ctx.get(a))) {
                (Ok(()), _) => format!("{cfg}: holds"),
                (Err(f), Some(v)) => format!("{cfg}: {f} (value {v})"),
                (Err(f), None) => format!("{cfg}: {f}"),
            };
            step(&format!("condition[{i}]"), Some(r.is_ok()), detail);
        }
        if let Some(vs) = &spec.variants {
            let weights: Vec<String> = vs.iter().map(|v| format!("{}={}", v.name, v.weight)).collect();
            let detail = if result.enabled {
                let mut trace = Trace::default();
                let chosen = flag.variant_index(ctx, &mut trace).and_then(|i| vs.iter().nth(i));
                match chosen {
                    Some(v) => format!(
                        "serves {:?} = {} (weights {}; fine bucket {})",
                        v.name,
                        v.value,
                        weights.join(", "),
                        flag.fine_bucket(ctx, &mut Trace::default())
                    ),
                    None => "no variant".to_owned(),
                }
            } else {
                format!("flag is off: no variant (weights {})", weights.join(", "))
            };
            step("variant", None, detail);
        }
        Explanation {
            flag: name.to_owned(),
            environment: self.environment.to_string(),
            result,
            steps,
        }
    }

    /// Steps for one prerequisite and, below it, the parent's own chain.
    fn explain_prerequisite<C: Context>(
        &self,
        check: &str,
        q: &super::config::Prerequisite,
        ctx: &C,
        now: i64,
        depth: usize,
        step: &mut impl FnMut(&str, Option<bool>, String),
    ) {
        let Some(parent) = self.flags.get(q.flag.as_bytes()) else {
            step(check, Some(false), format!("{q}: {:?} is not in the config", q.flag));
            return;
        };
        let mut trace = Trace::default();
        let reason = parent.evaluate_full(ctx, now, &self.flags, depth + 1, &mut trace);
        let on = matches!(reason, Reason::Enabled);
        let variant = if on {
            parent
                .variant_index(ctx, &mut trace)
                .and_then(|i| parent.variants()?.names.get(i).map(|n| n.to_string()))
        } else {
            None
        };
        let met = match &q.requirement {
            Requirement::On => on,
            Requirement::Off => !on,
            Requirement::Variant(v) => variant.as_deref() == Some(v.as_str()),
        };
        let state = match (&variant, on) {
            (Some(v), _) => format!("on, variant {v:?}"),
            (None, true) => "on".to_owned(),
            (None, false) => format!("off ({reason})"),
        };
        step(check, Some(met), format!("{q}: {:?} is {state}", q.flag));
        if depth + 1 >= super::config::MAX_PREREQUISITE_DEPTH {
            return;
        }
        if let Some(pspec) = self.config.get(&q.flag) {
            for (j, pq) in pspec.prerequisites.iter().enumerate() {
                self.explain_prerequisite(&format!("{check}.prerequisite[{j}]"), pq, ctx, now, depth + 1, step);
            }
        }
    }

    /// Whether a runtime override or the environment variable overrides `name`.
    pub fn override_of(&self, name: &str) -> Option<Override> {
        self.overrides.lookup(name)
    }
}

/// The closest known name by edit distance, for "did you mean".
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != *cb);
                let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
                let ins = cur.get(j).copied().unwrap_or(0) + 1;
                cur.push(sub.min(del).min(ins));
            }
            prev = cur;
        }
        prev.last().copied().unwrap_or(0)
    }
    known
        .iter()
        .map(|k| (distance(name, k), *k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

/// The outcome of [`Snapshot::evaluate_or_defer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferred<'s> {
    /// Evaluated (and counted).
    Evaluated(Evaluation),
    /// The flag's custom conditions without a Rust predicate, to be answered
    /// through [`Context::custom`].
    NeedsCustom(&'s [Box<str>]),
    /// A foreign context value's hash was needed and unknown
    /// ([`Context::complete`] is false); nothing was counted.
    NeedsHashes,
}

/// One flag in [`Snapshot::details`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlagDetails {
    /// The flag.
    pub name: String,
    /// `enabled` after schedule and overrides.
    pub effective_enabled: bool,
    /// Whether this environment is allowed now.
    pub environment_allowed: bool,
    /// The percentage in force now.
    pub rollout_percentage: u8,
    /// The basis points in force now, when the rollout is given in them
    /// (then `rollout_percentage` does not apply).
    pub rollout_basis_points: Option<u16>,
    /// Index of the schedule stage in force, if any.
    pub schedule_stage: Option<usize>,
    /// The override in force, if any.
    #[serde(rename = "override")]
    pub r#override: Option<Override>,
    /// Evaluation counts.
    pub counts: super::metrics::Counts,
    /// The flag as configured.
    pub config: FlagSpec,
}

/// The result of `explain`: the evaluation and every check on the way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The flag asked about.
    pub flag: String,
    /// The environment evaluated in.
    pub environment: String,
    /// The same result [`Snapshot::evaluate`] gives.
    pub result: Evaluation,
    /// Each check in evaluation order (all of them, also after the deciding one).
    pub steps: Vec<Step>,
}

/// One check in an [`Explanation`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// `flag`, `schedule`, `override`, `enabled`, `environment`, `rollout`, `condition[i]`.
    pub check: String,
    /// Whether it passed; `None` for informational steps.
    pub passed: Option<bool>,
    /// What was compared with what.
    pub detail: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} in {:?}: {} ({})",
            self.flag, self.environment, self.result.enabled, self.result.reason
        )?;
        for s in &self.steps {
            let mark = match s.passed {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "info",
            };
            writeln!(f, "  [{mark}] {:<13} {}", s.check, s.detail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_float_comparison_is_exact() {
        assert_eq!(cmp_int(2, Number::Float(2.5)), Ordering::Less);
        assert_eq!(cmp_int(3, Number::Float(2.5)), Ordering::Greater);
        assert_eq!(cmp_int(2, Number::Float(2.0)), Ordering::Equal);
        assert_eq!(cmp_int(-3, Number::Float(-2.5)), Ordering::Less);
        assert_eq!(cmp_int(i64::MAX, Number::Float(9.3e18)), Ordering::Less);
        assert_eq!(cmp_int(i64::MIN, Number::Float(-9.3e18)), Ordering::Greater);
        assert_eq!(
            cmp_int(9_007_199_254_740_993, Number::Float(9_007_199_254_740_992.0)),
            Ordering::Greater
        );
    }

    /// The inlined path (which sends flags with prerequisites or basis
    /// points to `evaluate_full`) and `evaluate_full` (also behind `details`
    /// and `explain`) decide alike, stages and real percentages included.
    #[test]
    fn the_fast_path_and_the_full_evaluator_agree() {
        use crate::flags::{Engine, FlagsConfig, ManualClock, MapContext};
        let config = FlagsConfig::from_json(
            br#"{"static": {"enabled": true}, "off": {}, "env": {"enabled": true, "environments": ["prod"]},
                 "roll": {"enabled": true, "rollout_percentage": 30, "salt": "s"},
                 "roll0": {"enabled": true, "rollout_percentage": 0},
                 "cond": {"enabled": true, "rollout_percentage": 70, "conditions": [{"user_id": "u-1"},
                          {"attribute": "n", "op": "gt", "values": [5]}, {"custom": "nobody"}]},
                 "sched": {"enabled": false, "schedule": [{"at": "2026-01-01", "enabled": true, "rollout_percentage": 40},
                          {"at": "2026-03-01", "environments": []}]},
                 "fine": {"enabled": true, "rollout_basis_points": 3000, "conditions": [{"user_id": "u-1"}],
                          "schedule": [{"at": "2026-01-01", "rollout_percentage": 60}, {"at": "2026-03-01", "rollout_basis_points": 10}]},
                 "child": {"enabled": true, "rollout_percentage": 80, "prerequisites": [{"flag": "roll"}, {"flag": "cond", "is": "off"}],
                           "schedule": [{"at": "2026-01-01", "rollout_percentage": 20}]}}"#,
        )
        .unwrap();
        for at in ["2025-12-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-04-01T00:00:00Z"] {
            let clock = Arc::new(ManualClock::at_rfc3339(at).unwrap());
            let engine = Engine::builder()
                .environment("dev")
                .clock(clock.clone())
                .build(config.clone());
            let snap = engine.snapshot();
            for i in 0..300 {
                let mut ctx = MapContext::new().binary("session_id", format!("s-{i}")).int("n", i % 9);
                if i % 3 == 0 {
                    ctx = ctx.binary("user_id", "u-1");
                }
                for (name, _) in config.iter() {
                    let f = snap.flags.get(name.as_bytes()).unwrap();
                    let fast = f.evaluate(&ctx, &*snap.clock, &snap.flags);
                    let full = f.evaluate_full(&ctx, clock.now_unix_ms(), &snap.flags, 0, &mut Trace::default());
                    assert_eq!(fast.reason, full, "{name} {at} {i}");
                }
            }
        }
    }

    #[test]
    fn closest_name_suggests_typos_only() {
        assert_eq!(
            closest("mcp_samplng", &["mcp_sampling", "mcp_tasks"]),
            Some("mcp_sampling")
        );
        assert_eq!(closest("zzz", &["mcp_sampling"]), None);
    }
}
