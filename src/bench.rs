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
    /// The fast path's instruction set (`avx512`, `avx2`, `baseline`), if it runs.
    pub isa: Option<&'static str>,
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
    /// CPU time and page faults of the whole process per timed pass (mean over the timed
    /// passes, not the warm-up), where the OS reports them.
    pub usage: Option<Usage>,
}

/// Resource use of this process over an interval (`getrusage`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub user_seconds: f64,
    pub sys_seconds: f64,
    pub minor_faults: u64,
    pub major_faults: u64,
}

impl Usage {
    /// This process's totals so far.
    #[cfg(unix)]
    pub fn now() -> Option<Self> {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes the struct it is given.
        let ru = unsafe {
            if libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) != 0 {
                return None;
            }
            ru.assume_init()
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(Self {
            user_seconds: secs(ru.ru_utime),
            sys_seconds: secs(ru.ru_stime),
            minor_faults: ru.ru_minflt as u64,
            major_faults: ru.ru_majflt as u64,
        })
    }

    #[cfg(not(unix))]
    pub fn now() -> Option<Self> {
        None
    }

    /// What was used between `earlier` and `self`, divided by `n`.
    pub fn since(&self, earlier: &Self, n: usize) -> Self {
        let n = n.max(1);
        Self {
            user_seconds: (self.user_seconds - earlier.user_seconds) / n as f64,
            sys_seconds: (self.sys_seconds - earlier.sys_seconds) / n as f64,
            minor_faults: (self.minor_faults - earlier.minor_faults) / n as u64,
            major_faults: (self.major_faults - earlier.major_faults) / n as u64,
        }
    }
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
    // The output is read where the pass leaves it, as tiled inference does; reading one
    // value also makes sure the work is done before the clock stops, whatever the device.
    let pass = || model.forward_with(&input, |out| Ok(out.row(0, 0)[0]));
    pass()?;
    let runs = runs.max(1);
    let mut times = Vec::with_capacity(runs);
    let before = Usage::now();
    for _ in 0..runs {
        let start = Instant::now();
        std::hint::black_box(pass()?);
        times.push(start.elapsed().as_secs_f64());
    }
    let usage = Usage::now()
        .zip(before)
        .map(|(after, before)| after.since(&before, runs));
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let gflop = 2.0 * model.spec().arch.macs_per_input_pixel() as f64 * (size * size) as f64 / 1e9;
    Ok(BenchResult {
        model: model.spec().name.to_string(),
        path: if model.is_fast() { "fast" } else { "reference" },
        isa: model.isa().map(|i| i.name()),
        width: size,
        height: size,
        runs: times.len(),
        seconds,
        min_seconds: times[0],
        gflop,
        gflops_per_s: gflop / seconds,
        peak_rss_bytes: peak_rss_bytes(),
        usage,
    })
}
