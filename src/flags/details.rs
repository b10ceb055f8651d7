//! Evaluation details in OpenFeature's vocabulary: the value served, the
//! variant, a reason from the OpenFeature specification, an error code when
//! the evaluation could not be done as asked, and the flag's metadata.
//!
//! | engine outcome ([`Reason`]) | OpenFeature reason |
//! |---|---|
//! | flag not in the config | `ERROR`, `FLAG_NOT_FOUND` |
//! | `disabled`, `environment`, `prerequisite` | `DISABLED` |
//! | `rollout` (outside the percentage or basis points) | `SPLIT` |
//! | `condition` (a condition did not hold) | `DEFAULT` |
//! | `enabled`, placed by a rollout below 100 % or a variant split | `SPLIT` |
//! | `enabled`, with conditions or prerequisites, no split | `TARGETING_MATCH` |
//! | `enabled`, nothing dynamic | `STATIC` |
//! | a rollout or split needed the stickiness value and the context has none | `ERROR`, `TARGETING_KEY_MISSING` |
//! | a context value cannot be read (adapters: OpenFeature floats, times, structures) | `ERROR`, `PARSE_ERROR` |
//! | a typed resolution of a value of another type (OpenFeature provider) | `ERROR`, `TYPE_MISMATCH` |
//!
//! `is_enabled` keeps the reference's rule for a missing stickiness value
//! (it hashes `<<>>`); `details` reports it as `TARGETING_KEY_MISSING`
//! instead, with no value (the caller's default applies), because serving a
//! cohort chosen by an empty key is almost always a caller's mistake.

use serde::Serialize;

use super::snapshot::{Evaluation, Reason};

/// OpenFeature's resolution reasons (the subset this engine produces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ResolutionReason {
    /// Nothing dynamic decided the value.
    Static,
    /// Conditions or prerequisites matched.
    TargetingMatch,
    /// A pseudo-random split (rollout or variant weights) placed the context.
    Split,
    /// The flag is off (disabled, not in this environment, or a prerequisite is not met).
    Disabled,
    /// Targeting did not match: the flag's default (off) applies.
    Default,
    /// The evaluation failed; see the error code.
    Error,
}

impl ResolutionReason {
    /// The specification's spelling: `STATIC`, `TARGETING_MATCH`, `SPLIT`,
    /// `DISABLED`, `DEFAULT`, `ERROR`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolutionReason::Static => "STATIC",
            ResolutionReason::TargetingMatch => "TARGETING_MATCH",
            ResolutionReason::Split => "SPLIT",
            ResolutionReason::Disabled => "DISABLED",
            ResolutionReason::Default => "DEFAULT",
            ResolutionReason::Error => "ERROR",
        }
    }
}

/// OpenFeature's error codes (the subset this engine produces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The config has no such flag.
    FlagNotFound,
    /// The value has another type than the one asked for.
    TypeMismatch,
    /// A context value could not be read by the adapter.
    ParseError,
    /// The stickiness value was needed and is absent.
    TargetingKeyMissing,
}

impl ErrorCode {
    /// The specification's spelling, e.g. `FLAG_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TargetingKeyMissing => "TARGETING_KEY_MISSING",
        }
    }
}

/// The result of [`super::Engine::details`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvaluationDetails {
    /// The flag asked about.
    pub flag: String,
    /// The value served: the variant's value for a flag with variants (none
    /// when it is off), `true`/`false` for a flag without; none on error.
    pub value: Option<serde_json::Value>,
    /// The variant served, for a flag with variants that is on.
    pub variant: Option<String>,
    /// Why, in OpenFeature's terms.
    pub reason: ResolutionReason,
    /// What went wrong, when `reason` is [`ResolutionReason::Error`].
    pub error_code: Option<ErrorCode>,
    /// A message naming what went wrong.
    pub error_message: Option<String>,
    /// The flag's `metadata` from the config (empty for an unknown flag).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The engine's own outcome, as `evaluate` gives it (the boolean of
    /// `is_enabled`, with its reason).
    pub evaluation: Evaluation,
}

impl EvaluationDetails {
    /// The same details turned into an error: no value, no variant.
    #[must_use]
    pub fn with_error(mut self, code: ErrorCode, message: impl Into<String>) -> EvaluationDetails {
        self.value = None;
        self.variant = None;
        self.reason = ResolutionReason::Error;
        self.error_code = Some(code);
        self.error_message = Some(message.into());
        self
    }

    /// Whether the evaluation failed.
    pub fn is_error(&self) -> bool {
        self.reason == ResolutionReason::Error
    }
}

/// The OpenFeature reason of an engine outcome (see the module table).
pub(crate) fn resolution_reason(reason: Reason, split: bool, targeted: bool) -> ResolutionReason {
    match reason {
        Reason::UnknownFlag => ResolutionReason::Error,
        Reason::Disabled | Reason::Environment | Reason::Prerequisite { .. } => ResolutionReason::Disabled,
        Reason::Rollout { .. } | Reason::FineRollout { .. } => ResolutionReason::Split,
        Reason::Condition { .. } => ResolutionReason::Default,
        Reason::Enabled if split => ResolutionReason::Split,
        Reason::Enabled if targeted => ResolutionReason::TargetingMatch,
        Reason::Enabled => ResolutionReason::Static,
    }
}
