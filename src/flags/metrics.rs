//! Per-flag evaluation counters: striped relaxed atomics, cheap enough for
//! every evaluation, and their Prometheus text rendering.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

const STRIPES: usize = 16;

/// One cache line per stripe so that threads counting the same flag do not
/// fight over a line.
#[repr(align(64))]
#[derive(Default)]
struct Stripe {
    true_count: AtomicU64,
    false_count: AtomicU64,
}

/// How often one flag evaluated to true and to false.
#[derive(Default)]
pub(crate) struct FlagCounters {
    stripes: [Stripe; STRIPES],
}

/// The stripe for the calling thread, from the address of a stack slot:
/// threads run on separate stacks, so they spread over stripes, and unlike a
/// thread-local this costs no `__tls_get_addr` call when the crate is loaded
/// as a shared library (the NIF). Which stripe a count lands in never
/// affects the totals.
#[inline(always)]
fn my_stripe() -> usize {
    let marker = 0u8;
    let addr = std::hint::black_box(&marker) as *const u8 as usize;
    // Thread stacks are megabytes apart; frames of one thread stay within a
    // few KiB of each other.
    (addr >> 20) % STRIPES
}

impl FlagCounters {
    #[inline]
    pub(crate) fn record(&self, enabled: bool) {
        if let Some(stripe) = self.stripes.get(my_stripe()) {
            let c = if enabled {
                &stripe.true_count
            } else {
                &stripe.false_count
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn read(&self) -> Counts {
        let mut out = Counts::default();
        for s in &self.stripes {
            out.true_count += s.true_count.load(Ordering::Relaxed);
            out.false_count += s.false_count.load(Ordering::Relaxed);
        }
        out
    }
}

impl std::fmt::Debug for FlagCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.read().fmt(f)
    }
}

/// Evaluation counts of one flag since the engine started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Evaluations that returned `true`.
    #[serde(rename = "true")]
    pub true_count: u64,
    /// Evaluations that returned `false`.
    #[serde(rename = "false")]
    pub false_count: u64,
}

/// Counts for every flag, plus evaluations of unknown flags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// Per flag, in name order (flags of the current config and flags that
    /// were evaluated before a reload removed them).
    pub flags: Vec<(String, Counts)>,
    /// Evaluations of names the config does not have.
    pub unknown_flag_evaluations: u64,
    /// Successful reloads since start.
    pub reloads: u64,
    /// Failed reloads since start.
    pub reload_failures: u64,
}

impl Metrics {
    /// The Prometheus text exposition format (version 0.0.4).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{Counts, Metrics};
    /// let m = Metrics { flags: vec![("mcp_tasks".into(), Counts { true_count: 3, false_count: 1 })], ..Default::default() };
    /// assert!(m.to_prometheus().contains("erlmcp_feature_flag_evaluations_total{flag=\"mcp_tasks\",result=\"true\"} 3\n"));
    /// ```
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP erlmcp_feature_flag_evaluations_total Feature flag evaluations by flag and result.\n");
        out.push_str("# TYPE erlmcp_feature_flag_evaluations_total counter\n");
        for (name, c) in &self.flags {
            let name = escape_label(name);
            let _ = writeln!(
                out,
                "erlmcp_feature_flag_evaluations_total{{flag=\"{name}\",result=\"true\"}} {}",
                c.true_count
            );
            let _ = writeln!(
                out,
                "erlmcp_feature_flag_evaluations_total{{flag=\"{name}\",result=\"false\"}} {}",
                c.false_count
            );
        }
        out.push_str(
            "# HELP erlmcp_feature_flag_unknown_evaluations_total Evaluations of flags missing from the config.\n",
        );
        out.push_str("# TYPE erlmcp_feature_flag_unknown_evaluations_total counter\n");
        let _ = writeln!(
            out,
            "erlmcp_feature_flag_unknown_evaluations_total {}",
            self.unknown_flag_evaluations
        );
        out.push_str("# HELP erlmcp_feature_flag_reloads_total Config reloads by outcome.\n");
        out.push_str("# TYPE erlmcp_feature_flag_reloads_total counter\n");
        let _ = writeln!(
            out,
            "erlmcp_feature_flag_reloads_total{{outcome=\"ok\"}} {}",
            self.reloads
        );
        let _ = writeln!(
            out,
            "erlmcp_feature_flag_reloads_total{{outcome=\"error\"}} {}",
            self.reload_failures
        );
        out
    }
}

/// Escape a Prometheus label value (`\`, `"` and newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        let c = std::sync::Arc::new(FlagCounters::default());
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for n in 0..10_000 {
                        c.record((n + i) % 3 == 0);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let r = c.read();
        assert_eq!(r.true_count + r.false_count, 80_000);
        let expected_true: u64 = (0..8)
            .map(|i| (0..10_000).filter(|n| (n + i) % 3 == 0).count() as u64)
            .sum();
        assert_eq!(r.true_count, expected_true);
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics {
            flags: vec![("a\"b\\c\nd".into(), Counts::default())],
            ..Default::default()
        };
        assert!(m.to_prometheus().contains(r#"flag="a\"b\\c\nd""#));
    }
}
