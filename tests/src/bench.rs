//! What the benchmarks share: settings from the environment and medians. Ratios are medians of
//! per-round ratios: each round runs every case once, back to back, so a round's ratio cancels
//! the machine's drift between rounds.

use std::time::Duration;

/// `name` parsed from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The number after `name` in `/proc/<pid>/<file>` (`VmRSS:` in `status`, `Pss:` in
/// `smaps_rollup`, …), or 0.
pub fn proc_field(pid: u32, file: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn median<T: Copy + Ord>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

/// The median over rounds of `ours[i] / theirs[i]`.
pub fn paired_ratio(ours: &[Duration], theirs: &[Duration]) -> f64 {
    let ratios: Vec<u64> = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a.as_secs_f64() / b.as_secs_f64() * 1e6) as u64)
        .collect();
    median(ratios) as f64 / 1e6
}
