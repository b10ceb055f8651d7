//! What a failed config load reports: every problem, with flag, JSON path and position.

use std::fmt;

use serde::Serialize;

use crate::json::SyntaxError;

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
