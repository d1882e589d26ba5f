//! Reading the benchmarks' load generator (`examples/stream.rs`) and summing up runs.

/// `key=value` from a `stream run` result line; NaN when the line has no such key.
pub fn field(line: &str, key: &str) -> f64 {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The median of some runs.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
