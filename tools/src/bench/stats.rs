//! Samples, their summary, and the report: a table for people, JSON for
//! tracking.

use std::time::Duration;

use serde::Serialize;

/// What one target measured for one workload.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// One latency per operation, or one value per repetition.
    pub samples: Vec<f64>,
    /// Operations done and the wall time they took, for ops/s.
    pub ops: usize,
    pub wall: Duration,
}

impl Series {
    pub fn add(&mut self, d: Duration) {
        self.samples.push(d.as_secs_f64() * 1e3);
        self.ops += 1;
        self.wall += d;
    }

    /// Adds a batch of latencies done in `wall` time (concurrently).
    pub fn add_batch(&mut self, latencies: &[Duration], wall: Duration) {
        self.samples
            .extend(latencies.iter().map(|d| d.as_secs_f64() * 1e3));
        self.ops += latencies.len();
        self.wall += wall;
    }

    pub fn add_value(&mut self, v: f64) {
        self.samples.push(v);
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub target: String,
    pub unit: &'static str,
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p99: f64,
    pub ops_per_sec: Option<f64>,
    /// This target's median over the first target's (lower is better).
    pub ratio: Option<f64>,
    /// This target's ops/s over the first target's (higher is better).
    pub throughput_ratio: Option<f64>,
}

/// The median of unsorted samples; NaN when there are none.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 0.5)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Summarises one workload's series, one per target in order; the first
/// target is the baseline of the ratios.
pub fn rows(workload: &str, unit: &'static str, series: &[(String, Series)]) -> Vec<Row> {
    let mut out: Vec<Row> = series
        .iter()
        .filter(|(_, s)| !s.samples.is_empty())
        .map(|(target, s)| {
            let mut sorted = s.samples.clone();
            sorted.sort_by(f64::total_cmp);
            Row {
                workload: workload.into(),
                target: target.clone(),
                unit,
                n: sorted.len(),
                min: sorted[0],
                median: percentile(&sorted, 0.5),
                p99: percentile(&sorted, 0.99),
                ops_per_sec: (s.ops > 0 && !s.wall.is_zero())
                    .then(|| s.ops as f64 / s.wall.as_secs_f64()),
                ratio: None,
                throughput_ratio: None,
            }
        })
        .collect();
    // Only a row of the first target is a baseline.
    let base = out
        .first()
        .filter(|r| Some(&r.target) == series.first().map(|(t, _)| t))
        .cloned();
    if let Some(base) = base {
        for r in &mut out {
            r.ratio = Some(r.median / base.median);
            r.throughput_ratio = r.ops_per_sec.zip(base.ops_per_sec).map(|(a, b)| a / b);
        }
    }
    out
}

pub fn print_header() {
    println!(
        "{:<34} {:<24} {:>7} {:>10} {:>10} {:>10} {:>11} {:>7}",
        "WORKLOAD", "TARGET", "N", "MIN", "MEDIAN", "P99", "OPS/S", "RATIO"
    );
}

pub fn print(row: &Row) {
    let v = |x: f64| match row.unit {
        "ms" => format!("{x:.3}ms"),
        "MiB" => format!("{x:.1}MiB"),
        u => format!("{x:.3}{u}"),
    };
    println!(
        "{:<34} {:<24} {:>7} {:>10} {:>10} {:>10} {:>11} {:>7}",
        row.workload,
        row.target,
        row.n,
        v(row.min),
        v(row.median),
        v(row.p99),
        row.ops_per_sec
            .map(|o| format!("{o:.0}"))
            .unwrap_or_else(|| "-".into()),
        row.ratio
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "-".into()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_summarise_and_compare_with_the_first_target() {
        let mut a = Series::default();
        let mut b = Series::default();
        for ms in [1, 2, 3, 4, 100] {
            a.add(Duration::from_millis(ms));
            b.add(Duration::from_millis(ms * 2));
        }
        let rows = rows("w", "ms", &[("a".into(), a), ("b".into(), b)]);
        assert_eq!(rows[0].median, 3.0);
        assert_eq!(rows[0].min, 1.0);
        assert_eq!(rows[0].p99, 100.0);
        assert_eq!(rows[1].ratio, Some(2.0));
        assert!((rows[1].throughput_ratio.unwrap() - 0.5).abs() < 1e-9);
        let ops = rows[0].ops_per_sec.unwrap();
        assert!((ops - 5.0 / 0.110).abs() < 1e-6, "{ops}");
    }
}
