//! An OpenFeature provider over [`Engine`] (feature `openfeature`, crate
//! `open-feature` 0.3): register an [`EngineProvider`] with the OpenFeature
//! API and evaluate through its `Client` (`get_bool_value`,
//! `get_string_details`, ...).
//!
//! - Every typed resolution evaluates the flag once with
//!   [`Engine::details`]: the value is the variant's value for a flag with
//!   variants, the boolean for a flag without. Reasons and error codes are
//!   OpenFeature's (see [`super::ResolutionReason`]); a value of another
//!   type than the one asked for is `TYPE_MISMATCH`. `float` accepts integer
//!   values too.
//! - A flag with variants that is off has no value: the provider returns the
//!   type's zero value (`false`, `0`, `""`, an empty structure) with reason
//!   `DISABLED` or `DEFAULT` and no variant; check the reason or use a flag
//!   without variants for on/off.
//! - Context: each custom field is a context value by its name (strings are
//!   Erlang binaries, integers integers, booleans the atoms `true`/`false`);
//!   the targeting key stands for any flag's stickiness key (e.g.
//!   `session_id`) that the context does not carry as a field. Floats,
//!   times and structures cannot be hashed or compared like Erlang terms: a
//!   flag that reads one fails with `PARSE_ERROR`.
//! - Flag metadata: the flag's `metadata`, strings, booleans and numbers as
//!   they are, other JSON values as their JSON text.

use std::cell::RefCell;
use std::sync::Arc;

use open_feature::provider::{FeatureProvider, ProviderMetadata, ProviderStatus, ResolutionDetails};
use open_feature::{
    async_trait, EvaluationContext, EvaluationContextFieldValue, EvaluationError, EvaluationErrorCode,
    EvaluationReason, EvaluationResult, FlagMetadata, FlagMetadataValue, StructValue,
};

use super::details::{ErrorCode, EvaluationDetails, ResolutionReason};
use super::engine::Engine;
use super::value::{Context, Value};

/// The provider's name in OpenFeature's provider metadata.
pub const PROVIDER_NAME: &str = "erlmcp-rollout";

/// An OpenFeature `FeatureProvider` over an [`Engine`] (shared: reloads and
/// overrides of the engine apply to the next resolution).
///
/// # Examples
/// ```
/// use std::sync::Arc;
/// use erlmcp_rollout::flags::{Engine, EngineProvider, FlagsConfig};
/// use open_feature::{EvaluationContext, OpenFeature};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let engine = Arc::new(Engine::builder().build(FlagsConfig::from_json(
///     br##"{"banner": {"enabled": true, "variants": {"blue": {"value": "#00f", "weight": 1}}}}"##).unwrap()));
/// let mut api = OpenFeature::default();
/// api.set_provider(EngineProvider::new(engine)).await;
/// let client = api.create_client();
/// let ctx = EvaluationContext::default().with_targeting_key("session-1");
/// assert_eq!(client.get_string_value("banner", Some(&ctx), None).await.unwrap(), "#00f");
/// # });
/// ```
#[derive(Debug)]
pub struct EngineProvider {
    engine: Arc<Engine>,
    metadata: ProviderMetadata,
}

impl EngineProvider {
    /// A provider answering from `engine`.
    pub fn new(engine: Arc<Engine>) -> EngineProvider {
        EngineProvider {
            engine,
            metadata: ProviderMetadata::new(PROVIDER_NAME),
        }
    }

    /// The engine behind it.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Evaluate `flag` with details, as the typed resolutions do.
    ///
    /// # Errors
    /// The OpenFeature error of the details (flag not found, targeting key
    /// missing, a context field that cannot be read).
    pub fn details(&self, flag: &str, ctx: &EvaluationContext) -> EvaluationResult<EvaluationDetails> {
        let snapshot = self.engine.snapshot();
        let stickiness: Vec<&str> = snapshot.config().iter().map(|(_, f)| f.stickiness.as_str()).collect();
        let c = OfContext {
            ctx,
            stickiness: &stickiness,
            bad: RefCell::new(None),
        };
        let d = snapshot.details(flag, &c);
        if let Some(key) = c.bad.into_inner() {
            return Err(error(
                EvaluationErrorCode::ParseError,
                format!("context field {key:?} is not a string, integer or boolean; flag {flag:?} reads it"),
            ));
        }
        match d.error_code {
            Some(code) => Err(error(of_code(code), d.error_message.unwrap_or_default())),
            None => Ok(d),
        }
    }

    fn resolve<T: Default>(
        &self,
        flag: &str,
        ctx: &EvaluationContext,
        want: &str,
        convert: impl FnOnce(&serde_json::Value) -> Option<T>,
    ) -> EvaluationResult<ResolutionDetails<T>> {
        let d = self.details(flag, ctx)?;
        let value = match &d.value {
            Some(v) => convert(v).ok_or_else(|| {
                error(
                    EvaluationErrorCode::TypeMismatch,
                    format!("flag {flag:?} serves {}, not {want}", super::config::value_kind(v)),
                )
            })?,
            None => T::default(),
        };
        Ok(ResolutionDetails {
            value,
            variant: d.variant,
            reason: Some(of_reason(d.reason)),
            flag_metadata: Some(metadata(&d.metadata)),
        })
    }
}

fn error(code: EvaluationErrorCode, message: String) -> EvaluationError {
    EvaluationError {
        code,
        message: Some(message),
    }
}

fn of_code(code: ErrorCode) -> EvaluationErrorCode {
    match code {
        ErrorCode::FlagNotFound => EvaluationErrorCode::FlagNotFound,
        ErrorCode::TypeMismatch => EvaluationErrorCode::TypeMismatch,
        ErrorCode::ParseError => EvaluationErrorCode::ParseError,
        ErrorCode::TargetingKeyMissing => EvaluationErrorCode::TargetingKeyMissing,
    }
}

fn of_reason(reason: ResolutionReason) -> EvaluationReason {
    match reason {
        ResolutionReason::Static => EvaluationReason::Static,
        ResolutionReason::TargetingMatch => EvaluationReason::TargetingMatch,
        ResolutionReason::Split => EvaluationReason::Split,
        ResolutionReason::Disabled => EvaluationReason::Disabled,
        ResolutionReason::Default => EvaluationReason::Default,
        ResolutionReason::Error => EvaluationReason::Error,
    }
}

fn metadata(m: &serde_json::Map<String, serde_json::Value>) -> FlagMetadata {
    let mut out = FlagMetadata::default();
    for (k, v) in m {
        let value = match v {
            serde_json::Value::Bool(b) => FlagMetadataValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => FlagMetadataValue::Int(i),
                None => FlagMetadataValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => FlagMetadataValue::String(s.clone()),
            other => FlagMetadataValue::String(other.to_string()),
        };
        out.add_value(k.clone(), value);
    }
    out
}

/// An OpenFeature evaluation context read as flag context values.
struct OfContext<'a> {
    ctx: &'a EvaluationContext,
    stickiness: &'a [&'a str],
    /// The first field that could not be read.
    bad: RefCell<Option<String>>,
}

impl Context for OfContext<'_> {
    fn get(&self, key: &str) -> Option<Value<'_>> {
        match self.ctx.custom_fields.get(key) {
            Some(EvaluationContextFieldValue::String(s)) => Some(Value::Binary(s.as_bytes())),
            Some(EvaluationContextFieldValue::Int(i)) => Some(Value::Int(*i)),
            Some(EvaluationContextFieldValue::Bool(b)) => Some(Value::Atom(if *b { "true" } else { "false" })),
            Some(_) => {
                self.bad.borrow_mut().get_or_insert_with(|| key.to_owned());
                None
            }
            None if self.stickiness.contains(&key) => {
                self.ctx.targeting_key.as_deref().map(|t| Value::Binary(t.as_bytes()))
            }
            None => None,
        }
    }
}

#[async_trait]
impl FeatureProvider for EngineProvider {
    fn status(&self) -> ProviderStatus {
        ProviderStatus::Ready
    }

    fn metadata(&self) -> &ProviderMetadata {
        &self.metadata
    }

    async fn resolve_bool_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<bool>> {
        self.resolve(flag_key, ctx, "a boolean", serde_json::Value::as_bool)
    }

    async fn resolve_int_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<i64>> {
        self.resolve(flag_key, ctx, "an integer", serde_json::Value::as_i64)
    }

    async fn resolve_float_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<f64>> {
        self.resolve(flag_key, ctx, "a float", |v| {
            v.as_number().and_then(serde_json::Number::as_f64)
        })
    }

    async fn resolve_string_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<String>> {
        self.resolve(flag_key, ctx, "a string", |v| v.as_str().map(str::to_owned))
    }

    async fn resolve_struct_value(
        &self,
        flag_key: &str,
        ctx: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<StructValue>> {
        self.resolve(flag_key, ctx, "a structure", |v| match v {
            serde_json::Value::Object(_) => match open_feature::Value::try_from(v) {
                Ok(open_feature::Value::Struct(s)) => Some(s),
                _ => None,
            },
            _ => None,
        })
    }
}
