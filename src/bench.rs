//! Forward-pass benchmark: seconds per pass and GFLOP/s for a model on square random inputs.
//!
//! GFLOP/s counts 2 x the multiply-adds of the network's convolutions computed directly, so
//! faster algorithms show as "effective" throughput.

use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::model::{Model, ModelError};

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub model: String,
    /// `fast` (the Winograd CPU path) or `reference` (candle's convolutions).
    pub path: &'static str,
    pub width: usize,
    pub height: usize,
    pub runs: usize,
    /// Median wall time of one forward pass.
    pub seconds: f64,
    pub min_seconds: f64,
    pub gflop: f64,
    pub gflops_per_s: f64,
    /// Peak resident memory of the whole process so far, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Times `runs` forward passes (after one warm-up pass) on a `size` x `size` random input.
pub fn bench_forward(model: &Model, size: usize, runs: usize) -> Result<BenchResult, ModelError> {
    let input =
        Tensor::rand(0f32, 1f32, (1, 3, size, size), model.device())?.to_dtype(DType::F32)?;
    model.forward(&input)?;
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let out = model.forward(&input)?;
        // Make sure the work is done before the clock stops, whatever the device.
        out.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let gflop = 2.0 * model.spec().arch.macs_per_input_pixel() as f64 * (size * size) as f64 / 1e9;
    Ok(BenchResult {
        model: model.spec().name.to_string(),
        path: if model.is_fast() { "fast" } else { "reference" },
        width: size,
        height: size,
        runs: times.len(),
        seconds,
        min_seconds: times[0],
        gflop,
        gflops_per_s: gflop / seconds,
        peak_rss_bytes: peak_rss_bytes(),
    })
}
