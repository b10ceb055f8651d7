//! The OpenFeature provider through the real SDK (`open-feature` 0.3): an
//! `OpenFeature` API instance, `set_provider`, and its `Client`'s typed
//! `get_*_value` / `get_*_details` calls.

use std::sync::Arc;

use erlmcp_rollout::flags::{Engine, EngineProvider, FlagsConfig, PROVIDER_NAME};
use open_feature::{
    Client, EvaluationContext, EvaluationErrorCode, EvaluationReason, FlagMetadataValue, OpenFeature, StructValue,
    Value,
};

const CONFIG: &str = r##"{
  "kill": {"enabled": true},
  "static_on": {"enabled": true, "metadata": {"phase": 2, "owner": "sessions", "ratio": 0.5, "tags": ["a"]}},
  "off": {"enabled": false},
  "half": {"enabled": true, "rollout_percentage": 50},
  "beta_users": {"enabled": true, "conditions": [{"attribute": "tier", "op": "in", "values": ["beta"]}]},
  "banner": {"enabled": true, "variants": {"blue": {"value": "#00f", "weight": 1}, "green": {"value": "#0f0", "weight": 1}},
             "prerequisites": [{"flag": "kill"}]},
  "limit": {"enabled": true, "variants": {"low": {"value": 10, "weight": 1}}},
  "ratio": {"enabled": true, "variants": {"r": {"value": 0.25, "weight": 1}}},
  "layout": {"enabled": true, "variants": {"wide": {"value": {"columns": 3, "name": "wide"}, "weight": 1}}},
  "by_version": {"enabled": true, "conditions": [{"attribute": "version", "op": "semver_gte", "values": ["1.2.0"]}]}
}"##;

async fn client(engine: Arc<Engine>) -> (OpenFeature, Client) {
    let mut api = OpenFeature::default();
    api.set_provider(EngineProvider::new(engine)).await;
    let client = api.create_client();
    (api, client)
}

fn engine() -> Arc<Engine> {
    Arc::new(Engine::builder().build(FlagsConfig::from_json(CONFIG.as_bytes()).unwrap()))
}

fn session(id: &str) -> EvaluationContext {
    EvaluationContext::default().with_targeting_key(id)
}

#[tokio::test]
async fn booleans_with_reasons_and_metadata() {
    let engine = engine();
    let (api, client) = client(engine.clone()).await;
    assert_eq!(api.provider_metadata().await.name, PROVIDER_NAME);

    let d = client
        .get_bool_details("static_on", Some(&session("s")), None)
        .await
        .unwrap();
    assert!(d.value);
    assert_eq!(d.reason, Some(EvaluationReason::Static));
    assert_eq!(d.flag_metadata.values["phase"], FlagMetadataValue::Int(2));
    assert_eq!(
        d.flag_metadata.values["owner"],
        FlagMetadataValue::String("sessions".into())
    );
    assert_eq!(d.flag_metadata.values["ratio"], FlagMetadataValue::Float(0.5));
    assert_eq!(
        d.flag_metadata.values["tags"],
        FlagMetadataValue::String("[\"a\"]".into())
    );

    let d = client.get_bool_details("off", None, None).await.unwrap();
    assert!(!d.value);
    assert_eq!(d.reason, Some(EvaluationReason::Disabled));

    let beta = EvaluationContext::default().with_custom_field("tier", "beta");
    let d = client.get_bool_details("beta_users", Some(&beta), None).await.unwrap();
    assert_eq!((d.value, d.reason), (true, Some(EvaluationReason::TargetingMatch)));
    let d = client.get_bool_details("beta_users", None, None).await.unwrap();
    assert_eq!((d.value, d.reason), (false, Some(EvaluationReason::Default)));

    // The 50 % rollout splits sessions, each one the way the engine does.
    let mut on = 0;
    for i in 0..200 {
        let id = format!("session-{i}");
        let d = client
            .get_bool_details("half", Some(&session(&id)), None)
            .await
            .unwrap();
        assert_eq!(d.reason, Some(EvaluationReason::Split));
        let ctx = erlmcp_rollout::flags::MapContext::new().binary("session_id", &id);
        assert_eq!(d.value, engine.is_enabled("half", &ctx), "{id}");
        on += usize::from(d.value);
    }
    assert!((60..=140).contains(&on), "{on} of 200 in a 50 % rollout");

    // A custom field under the stickiness key wins over the targeting key.
    let ctx = session("ignored").with_custom_field("session_id", "session-7");
    let by_field = client.get_bool_value("half", Some(&ctx), None).await.unwrap();
    let by_key = client
        .get_bool_value("half", Some(&session("session-7")), None)
        .await
        .unwrap();
    assert_eq!(by_field, by_key);
}

#[tokio::test]
async fn typed_variants_string_integer_float_structure() {
    let (_api, client) = client(engine()).await;
    let d = client
        .get_string_details("banner", Some(&session("s-1")), None)
        .await
        .unwrap();
    assert!(matches!(d.variant.as_deref(), Some("blue" | "green")));
    assert_eq!(
        d.value,
        if d.variant.as_deref() == Some("blue") {
            "#00f"
        } else {
            "#0f0"
        }
    );
    assert_eq!(d.reason, Some(EvaluationReason::Split));

    let d = client
        .get_int_details("limit", Some(&session("s-1")), None)
        .await
        .unwrap();
    assert_eq!(
        (d.value, d.variant.as_deref(), d.reason),
        (10, Some("low"), Some(EvaluationReason::Static))
    );
    assert_eq!(client.get_float_value("ratio", None, None).await.unwrap(), 0.25);
    assert_eq!(client.get_float_value("limit", None, None).await.unwrap(), 10.0);

    let s: StructValue = client.get_struct_value("layout", None, None).await.unwrap();
    assert_eq!(s.fields["columns"], Value::Int(3));
    assert_eq!(s.fields["name"], Value::String("wide".into()));
}

#[tokio::test]
async fn error_codes() {
    let engine = engine();
    let (_api, client) = client(engine.clone()).await;
    let e = client.get_bool_value("no_such_flag", None, None).await.unwrap_err();
    assert_eq!(e.code, EvaluationErrorCode::FlagNotFound);

    let e = client
        .get_int_value("banner", Some(&session("s")), None)
        .await
        .unwrap_err();
    assert_eq!(e.code, EvaluationErrorCode::TypeMismatch);
    assert!(e.message.unwrap().contains("serves string"));
    let e = client.get_bool_value("limit", None, None).await.unwrap_err();
    assert_eq!(e.code, EvaluationErrorCode::TypeMismatch);
    let e = client.get_string_value("static_on", None, None).await.unwrap_err();
    assert_eq!(e.code, EvaluationErrorCode::TypeMismatch);

    // A split needs the targeting key.
    let e = client.get_bool_value("half", None, None).await.unwrap_err();
    assert_eq!(e.code, EvaluationErrorCode::TargetingKeyMissing);
    let e = client.get_string_value("banner", None, None).await.unwrap_err();
    assert_eq!(e.code, EvaluationErrorCode::TargetingKeyMissing);

    // A float cannot be compared like an Erlang term.
    let ctx = EvaluationContext::default().with_custom_field("version", 1.5);
    let e = client.get_bool_value("by_version", Some(&ctx), None).await.unwrap_err();
    assert_eq!(e.code, EvaluationErrorCode::ParseError);
    let ctx = EvaluationContext::default().with_custom_field("version", "1.3.0");
    assert!(client.get_bool_value("by_version", Some(&ctx), None).await.unwrap());
}

#[tokio::test]
async fn the_kill_switch_and_reloads_reach_the_client() {
    let engine = engine();
    let (_api, client) = client(engine.clone()).await;
    let ctx = session("s-9");
    assert!(client
        .get_string_details("banner", Some(&ctx), None)
        .await
        .unwrap()
        .variant
        .is_some());
    engine.disable("kill");
    let d = client.get_string_details("banner", Some(&ctx), None).await.unwrap();
    assert_eq!(
        (d.value.as_str(), d.variant, d.reason),
        ("", None, Some(EvaluationReason::Disabled))
    );
    engine.clear("kill");
    engine.reload(
        FlagsConfig::from_json(
            br##"{"banner": {"enabled": true, "variants": {"red": {"value": "#f00", "weight": 5}}}}"##,
        )
        .unwrap(),
    );
    let d = client.get_string_details("banner", Some(&ctx), None).await.unwrap();
    assert_eq!((d.value.as_str(), d.variant.as_deref()), ("#f00", Some("red")));
}
