//! CI test scope from changed files (reference §I.C "Smart Change
//! Detection", `scripts/ci/detect_test_scope.sh`; DESIGN §6.4).
//!
//! [`classify`] maps changed paths to a [`Scope`]:
//! - `full` when a test file changed (a path with a `test/` directory
//!   component, or a file named `*_tests.erl` or `*_SUITE.erl`) or a
//!   critical path changed ([`ScopeConfig::critical_paths`], by default the
//!   reference's four `erlmcp_core` modules);
//! - `quick` when something under `apps/<app>/src/` changed, with those apps;
//! - `smoke` otherwise (docs, CI files, an empty diff).
//!
//! [`changed_files`] asks git for `git diff --name-only --no-renames -z
//! BASE...HEAD`: the three-dot form, as in the reference, lists what HEAD
//! changed since it forked from BASE (the merge base), which is what a pull
//! request changed; commits that landed on BASE meanwhile do not widen the
//! scope. `--no-renames` lists both sides of a rename, so moving a test file
//! away still counts as a test change. A shallow clone without the merge base
//! is an error ([`ScopeError::NoMergeBase`]); fetch more history.
//!
//! Unlike the reference's `grep` substring matching, paths are matched by
//! component: `docs/apps/x/src.md` is not an app change, `latest/notes` is
//! not a test directory, and critical paths match exactly (or, when written
//! with a trailing `/`, as a directory prefix). Apps are not limited to a
//! fixed list.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// Why the changed files could not be listed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeError {
    /// `git` could not be run.
    #[error("cannot run git: {0} (is git installed and on PATH?)")]
    GitNotFound(#[source] std::io::Error),
    /// The directory is not inside a git repository.
    #[error("{dir} is not a git repository: {message}")]
    NotARepository {
        /// The directory.
        dir: String,
        /// git's message.
        message: String,
    },
    /// A revision does not name a commit.
    #[error("unknown revision {rev:?}: not a commit in {dir} (fetch it, or check the name)")]
    UnknownRevision {
        /// The revision as given.
        rev: String,
        /// The repository.
        dir: String,
    },
    /// BASE and HEAD share no history (e.g. a shallow clone).
    #[error(
        "{base} and {head} have no merge base; in a shallow clone fetch more history (actions/checkout fetch-depth: 0)"
    )]
    NoMergeBase {
        /// BASE.
        base: String,
        /// HEAD.
        head: String,
    },
    /// Any other git failure.
    #[error("git {args} failed: {message}")]
    Git {
        /// The arguments.
        args: String,
        /// git's message.
        message: String,
    },
}

/// How much CI should test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// A smoke test only.
    Smoke,
    /// The changed apps' EUnit tests.
    Quick,
    /// Everything, with coverage.
    Full,
}

impl Scope {
    /// `smoke`, `quick` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Smoke => "smoke",
            Scope::Quick => "quick",
            Scope::Full => "full",
        }
    }
}

/// The reference's critical paths: a change to any of them runs everything.
pub const DEFAULT_CRITICAL_PATHS: [&str; 4] = [
    "apps/erlmcp_core/src/erlmcp_server.erl",
    "apps/erlmcp_core/src/erlmcp_client.erl",
    "apps/erlmcp_core/src/erlmcp_json_rpc.erl",
    "apps/erlmcp_core/src/erlmcp_registry.erl",
];

/// What to treat as critical and which command each scope runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScopeConfig {
    /// Paths (exact, or directories ending in `/`) that force `full`.
    pub critical_paths: Vec<String>,
    /// The `smoke` command.
    pub smoke_cmd: String,
    /// The `quick` command; `$apps` becomes the comma-separated app list.
    pub quick_cmd: String,
    /// The `full` command.
    pub full_cmd: String,
}

impl Default for ScopeConfig {
    fn default() -> Self {
        ScopeConfig {
            critical_paths: DEFAULT_CRITICAL_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            smoke_cmd: "rebar3 eunit --module=erlmcp_json_rpc_tests".into(),
            quick_cmd: "rebar3 eunit --app=$apps".into(),
            full_cmd: "rebar3 do eunit --cover, ct --cover".into(),
        }
    }
}

/// The result of [`classify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScopeReport {
    /// The scope.
    pub scope: Scope,
    /// Apps with changes under `apps/<app>/src/`, sorted, without duplicates.
    pub apps: Vec<String>,
    /// The command for the scope.
    pub test_cmd: String,
    /// Why: one line per reason (first matching file of each kind).
    pub reasons: Vec<String>,
    /// The changed files considered.
    pub changed_files: Vec<String>,
}

/// Whether `path` is a test file: a `test` directory component, or a file
/// named `*_tests.erl` / `*_SUITE.erl`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::ci_scope::is_test_file;
/// assert!(is_test_file("apps/erlmcp_core/test/erlmcp_server_tests.erl"));
/// assert!(is_test_file("test/fixtures/x.json"));
/// assert!(is_test_file("src/erlmcp_SUITE.erl"));
/// assert!(!is_test_file("docs/latest/notes.md"));
/// assert!(!is_test_file("apps/x/src/test.erl"));
/// ```
pub fn is_test_file(path: &str) -> bool {
    let mut parts: Vec<&str> = path.split('/').collect();
    let file = parts.pop().unwrap_or_default();
    parts.contains(&"test") || file.ends_with("_tests.erl") || file.ends_with("_SUITE.erl")
}

/// The app of a path under `apps/<app>/src/`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::ci_scope::app_of;
/// assert_eq!(app_of("apps/erlmcp_core/src/erlmcp_server.erl"), Some("erlmcp_core"));
/// assert_eq!(app_of("apps/erlmcp_core/include/x.hrl"), None);
/// assert_eq!(app_of("docs/apps/erlmcp_core/src/x.md"), None);
/// ```
pub fn app_of(path: &str) -> Option<&str> {
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("apps"), Some(app), Some("src"), Some(_)) if !app.is_empty() => Some(app),
        _ => None,
    }
}

fn is_critical(path: &str, critical: &[String]) -> bool {
    critical.iter().any(|c| {
        if c.ends_with('/') {
            path.starts_with(c.as_str())
        } else {
            path == c
        }
    })
}

/// Classify changed paths (relative to the repository root, `/`-separated).
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::ci_scope::{classify, Scope, ScopeConfig};
/// let cfg = ScopeConfig::default();
/// let r = classify(&["apps/erlmcp_transports/src/tcp.erl", "README.md"], &cfg);
/// assert_eq!((r.scope, r.apps.clone()), (Scope::Quick, vec!["erlmcp_transports".to_owned()]));
/// assert_eq!(r.test_cmd, "rebar3 eunit --app=erlmcp_transports");
/// assert_eq!(classify(&["apps/erlmcp_core/src/erlmcp_server.erl"], &cfg).scope, Scope::Full);
/// assert_eq!(classify(&["docs/guide.md"], &cfg).scope, Scope::Smoke);
/// ```
pub fn classify<S: AsRef<str>>(files: &[S], cfg: &ScopeConfig) -> ScopeReport {
    let mut scope = Scope::Smoke;
    let mut apps: Vec<String> = Vec::new();
    let mut reasons = Vec::new();
    let (mut saw_test, mut saw_critical) = (false, false);
    for f in files {
        let f = f.as_ref();
        if let Some(app) = app_of(f) {
            if !apps.iter().any(|a| a == app) {
                apps.push(app.to_owned());
                reasons.push(format!("{f}: source of app {app}"));
            }
            scope = scope.max(Scope::Quick);
        }
        if is_test_file(f) {
            if !saw_test {
                reasons.push(format!("{f}: test file"));
                saw_test = true;
            }
            scope = Scope::Full;
        }
        if is_critical(f, &cfg.critical_paths) {
            if !saw_critical {
                reasons.push(format!("{f}: critical path"));
                saw_critical = true;
            }
            scope = Scope::Full;
        }
    }
    apps.sort();
    if reasons.is_empty() {
        reasons.push(if files.is_empty() {
            "no changed files".to_owned()
        } else {
            "no source, test or critical file changed".to_owned()
        });
    }
    let test_cmd = match scope {
        Scope::Smoke => cfg.smoke_cmd.clone(),
        Scope::Quick => cfg.quick_cmd.replace("$apps", &apps.join(",")),
        Scope::Full => cfg.full_cmd.clone(),
    };
    ScopeReport {
        scope,
        apps,
        test_cmd,
        reasons,
        changed_files: files.iter().map(|f| f.as_ref().to_owned()).collect(),
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output, ScopeError> {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("LC_ALL", "C")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .map_err(ScopeError::GitNotFound)
}

fn stderr_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// The files that `head` changed since it forked from `base`, in the
/// repository containing `dir` (see the module docs for the exact git
/// command).
///
/// # Errors
/// [`ScopeError::NotARepository`], [`ScopeError::UnknownRevision`],
/// [`ScopeError::NoMergeBase`], [`ScopeError::GitNotFound`],
/// [`ScopeError::Git`].
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::ci_scope::{changed_files, ScopeError};
/// let err = changed_files(std::path::Path::new("/"), "HEAD~1", "HEAD").unwrap_err();
/// assert!(matches!(err, ScopeError::NotARepository { .. }));
/// ```
pub fn changed_files(dir: &Path, base: &str, head: &str) -> Result<Vec<String>, ScopeError> {
    let shown = dir.display().to_string();
    let out = git(dir, &["rev-parse", "--git-dir"])?;
    if !out.status.success() {
        return Err(ScopeError::NotARepository {
            dir: shown,
            message: stderr_text(&out),
        });
    }
    for rev in [base, head] {
        let unknown = || ScopeError::UnknownRevision {
            rev: rev.to_owned(),
            dir: shown.clone(),
        };
        if rev.is_empty() || rev.starts_with('-') {
            return Err(unknown());
        }
        let spec = format!("{rev}^{{commit}}");
        let out = git(dir, &["rev-parse", "--verify", "--quiet", "--end-of-options", &spec])?;
        if !out.status.success() {
            return Err(unknown());
        }
    }
    let out = git(dir, &["merge-base", "--", base, head])?;
    if !out.status.success() {
        // Exit 1 with no output: the histories share no commit.
        if out.status.code() == Some(1) && out.stderr.is_empty() {
            return Err(ScopeError::NoMergeBase {
                base: base.to_owned(),
                head: head.to_owned(),
            });
        }
        return Err(ScopeError::Git {
            args: format!("merge-base {base} {head}"),
            message: stderr_text(&out),
        });
    }
    let range = format!("{base}...{head}");
    let args = [
        "diff",
        "--name-only",
        "--no-renames",
        "--no-ext-diff",
        "-z",
        &range,
        "--",
    ];
    let out = git(dir, &args)?;
    if !out.status.success() {
        return Err(ScopeError::Git {
            args: args.join(" "),
            message: stderr_text(&out),
        });
    }
    Ok(out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect())
}

/// [`changed_files`] then [`classify`].
///
/// # Errors
/// As [`changed_files`].
pub fn detect(dir: &Path, base: &str, head: &str, cfg: &ScopeConfig) -> Result<ScopeReport, ScopeError> {
    Ok(classify(&changed_files(dir, base, head)?, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_rules() {
        let cfg = ScopeConfig::default();
        let r = classify(&["apps/b/src/x.erl", "apps/a/src/y.erl", "apps/b/src/z.erl"], &cfg);
        assert_eq!(r.apps, ["a", "b"]);
        assert_eq!(r.test_cmd, "rebar3 eunit --app=a,b");
        let r = classify(&["apps/a/src/y.erl", "apps/a/test/y_tests.erl"], &cfg);
        assert_eq!((r.scope, r.apps.len()), (Scope::Full, 1));
        assert_eq!(r.test_cmd, "rebar3 do eunit --cover, ct --cover");
        let empty: [&str; 0] = [];
        assert_eq!(classify(&empty, &cfg).scope, Scope::Smoke);
        let dir = ScopeConfig {
            critical_paths: vec!["rebar.config".into(), "config/".into()],
            ..ScopeConfig::default()
        };
        assert_eq!(classify(&["config/sys.config"], &dir).scope, Scope::Full);
        assert_eq!(classify(&["rebar.config.script"], &dir).scope, Scope::Smoke);
        // Substrings are not paths.
        assert_eq!(
            classify(&["apps/erlmcp_core/src/erlmcp_server.erl.orig"], &cfg).scope,
            Scope::Quick
        );
    }
}
