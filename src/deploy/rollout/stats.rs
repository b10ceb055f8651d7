//! Canary-vs-stable statistics on one observation window (DESIGN §6.6).
//!
//! - [`two_proportion`]: the one-sided two-proportion z-test (pooled variance,
//!   as statsmodels' `proportions_ztest(..., alternative="larger")`): is the
//!   canary's error rate higher than stable's, beyond chance?
//! - [`Histogram`] and [`compare_histograms`]: latency as Prometheus histogram
//!   bucket counts (`le` upper bounds, cumulative). Quantiles are interpolated
//!   inside buckets as `histogram_quantile` does; the comparison is the
//!   Mann-Whitney U test on the binned samples (one bucket = one tie group,
//!   tie-corrected variance, continuity correction; as scipy's
//!   `mannwhitneyu(x, y, alternative="greater", method="asymptotic")`): is a
//!   canary request slower than a stable one more often than the reverse? It
//!   uses every bucket, not only a point quantile.
//!
//! Both tests refuse to answer ([`Test::Inconclusive`]) below a minimum sample
//! per side, and with non-finite or negative inputs: too little data is never
//! a pass.

use serde::Serialize;

/// The result of a test: a p-value, or why there is none.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Test {
    /// Enough data: the statistic and its one-sided p-value.
    Done {
        /// The z statistic (positive: canary worse).
        z: f64,
        /// One-sided p-value for "canary worse than stable".
        p_value: f64,
    },
    /// Not enough data, or unusable data.
    Inconclusive {
        /// Why.
        reason: String,
    },
}

impl Test {
    /// The p-value, if the test ran.
    pub fn p_value(&self) -> Option<f64> {
        match self {
            Test::Done { p_value, .. } => Some(*p_value),
            Test::Inconclusive { .. } => None,
        }
    }
}

/// `P(Z > z)` for a standard normal `Z`.
///
/// Uses the Chebyshev-fitted `erfc` of Numerical Recipes (§6.2, `erfcc`),
/// whose fractional error is below 1.2e-7 everywhere.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::rollout::stats::normal_sf;
/// assert!((normal_sf(0.0) - 0.5).abs() < 1e-7);
/// assert!((normal_sf(1.959964) - 0.025).abs() < 1e-7);
/// ```
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let ans = t * poly.exp();
    if x >= 0.0 {
        ans
    } else {
        2.0 - ans
    }
}

fn usable(values: &[f64]) -> bool {
    values.iter().all(|v| v.is_finite() && *v >= 0.0)
}

/// One-sided two-proportion z-test: is `canary_errors / canary_total` larger
/// than `stable_errors / stable_total`? Pooled variance. Inconclusive when a
/// side has fewer than `min_sample` requests, errors exceed requests, or an
/// input is NaN, infinite or negative. With no errors on either side (zero
/// pooled variance) there is no evidence of a difference: `z = 0`, `p = 1`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::rollout::stats::{two_proportion, Test};
/// // 20 errors in 1000 canary requests vs 5 in 1000 stable ones.
/// let t = two_proportion(20.0, 1000.0, 5.0, 1000.0, 100.0);
/// assert!(t.p_value().unwrap() < 0.01);
/// assert!(matches!(two_proportion(2.0, 50.0, 0.0, 5000.0, 100.0), Test::Inconclusive { .. }));
/// ```
pub fn two_proportion(
    canary_errors: f64,
    canary_total: f64,
    stable_errors: f64,
    stable_total: f64,
    min_sample: f64,
) -> Test {
    let inconclusive = |reason: String| Test::Inconclusive { reason };
    if !usable(&[canary_errors, canary_total, stable_errors, stable_total]) {
        return inconclusive("an error or request count is NaN, infinite or negative".into());
    }
    if canary_errors > canary_total || stable_errors > stable_total {
        return inconclusive("more errors than requests (counters from different scrapes?)".into());
    }
    if canary_total < min_sample || stable_total < min_sample {
        return inconclusive(format!(
            "too few requests for the error-rate test: canary {}, stable {} (minimum {min_sample} each)",
            canary_total.round(),
            stable_total.round()
        ));
    }
    let pc = canary_errors / canary_total;
    let ps = stable_errors / stable_total;
    let pooled = (canary_errors + stable_errors) / (canary_total + stable_total);
    let var = pooled * (1.0 - pooled) * (1.0 / canary_total + 1.0 / stable_total);
    if var <= 0.0 {
        return Test::Done { z: 0.0, p_value: 1.0 };
    }
    let z = (pc - ps) / var.sqrt();
    Test::Done {
        z,
        p_value: normal_sf(z),
    }
}

/// A latency histogram: cumulative counts per bucket upper bound (seconds),
/// as Prometheus' `_bucket{le=...}` series. The last bound is `+Inf`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Histogram {
    /// `(le, cumulative count)`, sorted by `le`, ending with `+Inf`.
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Build from `(le, cumulative count)` pairs in any order. Counts are made
    /// monotonic (Prometheus' own fix for scrapes that straddle an update).
    ///
    /// # Errors
    /// A message when there is no `+Inf` bucket or a bound or count is NaN or
    /// negative.
    pub fn from_cumulative(mut pairs: Vec<(f64, f64)>) -> Result<Histogram, String> {
        if pairs
            .iter()
            .any(|(le, c)| le.is_nan() || c.is_nan() || *c < 0.0 || c.is_infinite())
        {
            return Err("a bucket bound or count is NaN, infinite or negative".into());
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        pairs.dedup_by(|a, b| a.0 == b.0);
        if pairs.last().is_none_or(|(le, _)| *le != f64::INFINITY) {
            return Err("no +Inf bucket".into());
        }
        let mut max = 0.0f64;
        for p in &mut pairs {
            max = max.max(p.1);
            p.1 = max;
        }
        Ok(Histogram { buckets: pairs })
    }

    /// Total observations (the `+Inf` bucket).
    pub fn total(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket
    /// (the first bucket from 0). A quantile in the `+Inf` bucket is the
    /// largest finite bound, as `histogram_quantile` answers. `None` without
    /// observations.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::deploy::rollout::stats::Histogram;
    /// let h = Histogram::from_cumulative(vec![(0.005, 85.0), (0.01, 99.0), (f64::INFINITY, 100.0)])?;
    /// let p95 = h.quantile(0.95).unwrap();
    /// assert!((p95 - (0.005 + 0.005 * 10.0 / 14.0)).abs() < 1e-12);
    /// # Ok::<(), String>(())
    /// ```
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total.is_nan() || total <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total;
        let mut prev_le = 0.0;
        let mut prev_count = 0.0;
        for &(le, count) in &self.buckets {
            if count >= rank {
                if le == f64::INFINITY {
                    return Some(prev_le);
                }
                let in_bucket = count - prev_count;
                if in_bucket <= 0.0 {
                    return Some(le);
                }
                return Some(prev_le + (le - prev_le) * (rank - prev_count) / in_bucket);
            }
            prev_le = le;
            prev_count = count;
        }
        Some(prev_le)
    }

    /// The count in each bucket (not cumulative), by the bounds of `bounds`.
    fn counts_on(&self, bounds: &[f64]) -> Vec<f64> {
        let mut out = Vec::with_capacity(bounds.len());
        let mut prev = 0.0;
        for le in bounds {
            // Cumulative count at `le`: the count of the largest own bound <= le.
            let cum = self
                .buckets
                .iter()
                .take_while(|(b, _)| b <= le)
                .last()
                .map_or(0.0, |b| b.1);
            out.push((cum - prev).max(0.0));
            prev = cum.max(prev);
        }
        out
    }
}

/// The latency comparison of one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HistogramComparison {
    /// Canary observations.
    pub canary_total: f64,
    /// Stable observations.
    pub stable_total: f64,
    /// `P(canary slower) + P(tie)/2`, from the bucket counts (0.5: no
    /// difference; the "common-language effect size").
    pub prob_canary_slower: Option<f64>,
    /// The Mann-Whitney test, one-sided (canary slower).
    pub test: Test,
}

/// Compare canary and stable latency histograms bucket by bucket (see the
/// module docs). Buckets are compared on the bounds both sides have.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::rollout::stats::{compare_histograms, Histogram};
/// let inf = f64::INFINITY;
/// let stable = Histogram::from_cumulative(vec![(0.001, 600.0), (0.002, 900.0), (0.004, 1000.0), (inf, 1000.0)])?;
/// let canary = Histogram::from_cumulative(vec![(0.001, 100.0), (0.002, 400.0), (0.004, 1000.0), (inf, 1000.0)])?;
/// let c = compare_histograms(&canary, &stable, 100.0);
/// assert!(c.test.p_value().unwrap() < 1e-6);
/// assert!(c.prob_canary_slower.unwrap() > 0.7);
/// # Ok::<(), String>(())
/// ```
pub fn compare_histograms(canary: &Histogram, stable: &Histogram, min_sample: f64) -> HistogramComparison {
    let (n1, n2) = (canary.total(), stable.total());
    let mut out = HistogramComparison {
        canary_total: n1,
        stable_total: n2,
        prob_canary_slower: None,
        test: Test::Inconclusive { reason: String::new() },
    };
    if n1 < min_sample || n2 < min_sample {
        out.test = Test::Inconclusive {
            reason: format!(
                "too few latency observations: canary {}, stable {} (minimum {min_sample} each)",
                n1.round(),
                n2.round()
            ),
        };
        return out;
    }
    // Compare on the bounds both sides have (always at least +Inf): a bucket
    // only one side splits cannot be compared finer than the other side knows.
    let bounds: Vec<f64> = canary
        .buckets
        .iter()
        .map(|b| b.0)
        .filter(|le| stable.buckets.iter().any(|s| s.0 == *le))
        .collect();
    let c = canary.counts_on(&bounds);
    let s = stable.counts_on(&bounds);
    // U for the canary: pairs where the canary observation is in a higher
    // bucket than the stable one, plus half the pairs in the same bucket.
    let mut u = 0.0;
    let mut stable_below = 0.0;
    let mut ties = 0.0;
    for (ci, si) in c.iter().zip(&s) {
        u += ci * (stable_below + 0.5 * si);
        stable_below += si;
        let t = ci + si;
        ties += t * t * t - t;
    }
    let n = n1 + n2;
    out.prob_canary_slower = Some(u / (n1 * n2));
    let mean = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var.is_nan() || var <= 0.0 {
        // Every observation in one bucket: the histograms cannot tell the sides apart.
        out.test = Test::Done { z: 0.0, p_value: 1.0 };
        return out;
    }
    let z = (u - mean - 0.5) / var.sqrt();
    out.test = Test::Done {
        z,
        p_value: normal_sf(z),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol * b.abs().max(1e-300), "{a} vs {b}");
    }

    #[test]
    fn normal_tail_matches_tables() {
        // Standard normal upper tail, R: pnorm(z, lower.tail = FALSE).
        for (z, p) in [
            (0.0, 0.5),
            (1.0, 0.158_655_253_931_457_05),
            (1.644_853_626_951_472_2, 0.05),
            (2.326_347_874_040_840_8, 0.01),
            (3.0, 0.001_349_898_031_630_094_6),
            (-1.0, 0.841_344_746_068_542_9),
        ] {
            close(normal_sf(z), p, 2e-7);
        }
    }

    /// Reference values computed with statsmodels 0.15.0 and scipy 1.17.1:
    /// ```text
    /// from statsmodels.stats.proportion import proportions_ztest
    /// from scipy.stats import mannwhitneyu, norm
    /// proportions_ztest([ec, es], [nc, ns], alternative='larger')
    /// x = np.repeat(np.arange(len(c)), c); y = np.repeat(np.arange(len(s)), s)
    /// mannwhitneyu(x, y, alternative='greater', method='asymptotic', use_continuity=True)
    /// ```
    #[test]
    fn two_proportion_matches_statsmodels() {
        for (ec, nc, es, ns, z, p) in [
            (20.0, 1000.0, 5.0, 1000.0, 3.018927632559765, 0.0012683555874842517),
            (3.0, 400.0, 10.0, 9000.0, 3.364382980625962, 0.00038357504245105785),
            (12.0, 5000.0, 40.0, 20000.0, 0.5552779859376514, 0.2893522669835452),
            (0.0, 500.0, 2.0, 9500.0, -0.32447529141320514, 0.6272108870959461),
        ] {
            let Test::Done { z: gz, p_value } = two_proportion(ec, nc, es, ns, 100.0) else {
                panic!("inconclusive")
            };
            close(gz, z, 1e-12);
            close(p_value, p, 1e-6);
        }
        close(normal_sf(2.5), 0.006209665325776132, 1e-6);
        close(normal_sf(-0.3), 0.6179114221889526, 1e-6);
    }

    fn cumulative(bounds: &[f64], counts: &[f64]) -> Histogram {
        let mut cum = 0.0;
        let pairs = bounds
            .iter()
            .zip(counts)
            .map(|(b, c)| {
                cum += c;
                (*b, cum)
            })
            .collect();
        Histogram::from_cumulative(pairs).unwrap()
    }

    #[test]
    fn histogram_test_matches_scipy() {
        let inf = f64::INFINITY;
        let b4 = [0.001, 0.002, 0.004, inf];
        let b5 = [0.001, 0.002, 0.004, 0.008, inf];
        for (bounds, c, s, p, a) in [
            (
                &b4[..],
                &[100.0, 300.0, 600.0, 0.0][..],
                &[600.0, 300.0, 100.0, 0.0][..],
                1.400666157022932e-157,
                0.825,
            ),
            (
                &b5[..],
                &[10.0, 50.0, 200.0, 150.0, 90.0][..],
                &[12.0, 60.0, 190.0, 160.0, 80.0][..],
                0.24998635095782246,
                0.5117131474103586,
            ),
            (
                &b5[..],
                &[0.0, 5.0, 40.0, 300.0, 155.0][..],
                &[20.0, 200.0, 280.0, 0.0, 0.0][..],
                1.7474190225620954e-157,
                0.97,
            ),
        ] {
            let r = compare_histograms(&cumulative(bounds, c), &cumulative(bounds, s), 100.0);
            close(r.test.p_value().unwrap(), p, 1e-6);
            close(r.prob_canary_slower.unwrap(), a, 1e-12);
        }
        // Different bucket layouts are compared on the bounds both have.
        let coarse = Histogram::from_cumulative(vec![(0.002, 400.0), (inf, 1000.0)]).unwrap();
        let fine = cumulative(&b4, &[100.0, 300.0, 600.0, 0.0]);
        let r = compare_histograms(&fine, &coarse, 100.0);
        close(r.prob_canary_slower.unwrap(), 0.5, 1e-12);
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let h = cumulative(&[0.005, 0.01, 0.025, f64::INFINITY], &[85.0, 14.0, 1.0, 0.0]);
        // rank 95 in (85, 99]: 5 ms + 5 ms * 10/14 = 8.571 ms (the deploy_prometheus fixture's p95).
        close(h.quantile(0.95).unwrap(), 0.008_571_428_571_428_572, 1e-12);
        let top = cumulative(&[0.005, f64::INFINITY], &[50.0, 50.0]);
        assert_eq!(top.quantile(0.99), Some(0.005));
    }

    #[test]
    fn inconclusive_inputs() {
        assert!(matches!(
            two_proportion(f64::NAN, 1e4, 0.0, 1e4, 10.0),
            Test::Inconclusive { .. }
        ));
        assert!(matches!(
            two_proportion(11.0, 10.0, 0.0, 1e4, 1.0),
            Test::Inconclusive { .. }
        ));
        assert!(matches!(
            two_proportion(0.0, 99.0, 0.0, 1e4, 100.0),
            Test::Inconclusive { .. }
        ));
        assert_eq!(
            two_proportion(0.0, 1e4, 0.0, 1e4, 100.0),
            Test::Done { z: 0.0, p_value: 1.0 }
        );
        assert!(Histogram::from_cumulative(vec![(0.1, 3.0)]).is_err());
        let h = Histogram::from_cumulative(vec![(0.1, 0.0), (f64::INFINITY, 0.0)]).unwrap();
        assert_eq!(h.quantile(0.5), None);
    }
}
