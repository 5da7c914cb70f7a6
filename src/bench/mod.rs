//! Benchmarks: library functions that measure and return rows, for `unet3d bench` and
//! `cargo bench` to print.

pub mod conv;
pub mod step;

use std::time::Instant;

/// Median wall time in seconds of `reps` runs of `f`, after one untimed warm-up run.
pub fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_runs_warm_up_plus_reps() {
        let mut calls = 0;
        let t = median_secs(3, || calls += 1);
        assert_eq!(calls, 4);
        assert!(t >= 0.0);
    }
}
