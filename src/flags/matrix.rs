//! CI feature matrices (DESIGN §6.1, `flags matrix`): which flag sets CI
//! should test, as JSON a CI `strategy.matrix` can consume.

use serde::Serialize;

use super::config::FlagsConfig;

/// One CI feature set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FeatureSet {
    /// `baseline`, `phase1`..`phaseN` or `all_enabled`.
    pub name: String,
    /// The flags switched on, by name.
    pub enabled: Vec<String>,
    /// The same as an `ERLMCP_FEATURE_FLAGS` value.
    pub erlmcp_feature_flags: String,
}

/// A matrix: `{"include": [feature sets...]}`, the shape GitHub Actions'
/// `strategy.matrix` takes through `fromJSON`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// The feature sets, baseline first.
    pub include: Vec<FeatureSet>,
}

/// The feature sets for `config`: `baseline` (every flag off), `phaseN` for
/// each phase N from 1 to the highest `metadata.phase` (flags with
/// `phase <= N` on, the rest off), and `all_enabled`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{matrix::matrix, FlagsConfig};
/// let c = FlagsConfig::from_json(br#"{"a": {"metadata": {"phase": 1}}, "b": {"metadata": {"phase": 2}}, "c": {}}"#)?;
/// let names: Vec<_> = matrix(&c).include.into_iter().map(|s| (s.name, s.erlmcp_feature_flags)).collect();
/// assert_eq!(names, vec![
///     ("baseline".to_owned(), "all_disabled".to_owned()),
///     ("phase1".to_owned(), "all_disabled,a:enabled".to_owned()),
///     ("phase2".to_owned(), "all_disabled,a:enabled,b:enabled".to_owned()),
///     ("all_enabled".to_owned(), "all_enabled".to_owned()),
/// ]);
/// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
/// ```
pub fn matrix(config: &FlagsConfig) -> Matrix {
    let max_phase = config.iter().filter_map(|(_, f)| f.phase()).max().unwrap_or(0);
    let mut include = vec![FeatureSet {
        name: "baseline".into(),
        enabled: Vec::new(),
        erlmcp_feature_flags: "all_disabled".into(),
    }];
    for phase in 1..=max_phase {
        let enabled: Vec<String> = config
            .iter()
            .filter(|(_, f)| f.phase().is_some_and(|p| p <= phase))
            .map(|(n, _)| n.to_owned())
            .collect();
        let mut env = String::from("all_disabled");
        for n in &enabled {
            env.push(',');
            env.push_str(n);
            env.push_str(":enabled");
        }
        include.push(FeatureSet {
            name: format!("phase{phase}"),
            enabled,
            erlmcp_feature_flags: env,
        });
    }
    include.push(FeatureSet {
        name: "all_enabled".into(),
        enabled: config.iter().map(|(n, _)| n.to_owned()).collect(),
        erlmcp_feature_flags: "all_enabled".into(),
    });
    Matrix { include }
}
