//! Per-flag evaluation counters: per-thread stripes of relaxed atomics,
//! cheap enough for every evaluation, and their Prometheus text rendering.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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

/// Stripes owned by one thread each; threads beyond them share the last.
const SHARED: usize = STRIPES - 1;

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe, `usize::MAX` until it first counts.
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The stripe for the calling thread. The first `SHARED` threads that count
/// each get a stripe of their own for good, so their increments need no
/// atomic read-modify-write (a `lock`ed instruction costs more than the rest
/// of a static flag's evaluation): only the owner writes it, readers see a
/// value at most one increment old. Later threads share the last stripe
/// with `fetch_add`. Which stripe a count lands in never affects the totals.
#[inline(always)]
fn my_stripe() -> usize {
    STRIPE.with(|s| {
        let mine = s.get();
        if mine != usize::MAX {
            return mine;
        }
        let mine = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed).min(SHARED);
        s.set(mine);
        mine
    })
}

impl FlagCounters {
    #[inline]
    pub(crate) fn record(&self, enabled: bool) {
        let at = my_stripe();
        if let Some(stripe) = self.stripes.get(at) {
            let c = if enabled {
                &stripe.true_count
            } else {
                &stripe.false_count
            };
            if at < SHARED {
                // This thread's own stripe: nobody else writes it.
                c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
            } else {
                c.fetch_add(1, Ordering::Relaxed);
            }
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
        // More threads than stripes: owned stripes and the shared one.
        let threads = STRIPES as u64 * 2;
        let handles: Vec<_> = (0..threads)
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
        assert_eq!(r.true_count + r.false_count, threads * 10_000);
        let expected_true: u64 = (0..threads)
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
