//! Named places where the fault tests hold a process still (`--features failpoints` only;
//! in other builds `pause_at` does nothing and compiles away).
//!
//! `FAILPOINTS="result-swap=1*return(3000)"` makes the first pass through that point
//! wait 3000 ms, after logging "paused at a failpoint", so a test can send the process a
//! signal at exactly that step.

/// Waits as long as the failpoint `name` is configured to (`return(MS)`), on the async
/// executor (a sleeping worker thread would stall unrelated tasks).
#[cfg(feature = "failpoints")]
pub(crate) async fn pause_at(name: &'static str) {
    let configured = || -> Option<u64> {
        fail::fail_point!(name, |arg: Option<String>| arg.and_then(|a| a.parse().ok()));
        None
    };
    if let Some(ms) = configured() {
        tracing::info!(failpoint = name, ms, "paused at a failpoint");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn pause_at(_name: &'static str) {}

/// Whether the failpoint `name` is configured to fire now (`return`), for faults that are
/// injected rather than waited out.
#[cfg(feature = "failpoints")]
pub(crate) fn fires(name: &'static str) -> bool {
    let configured = || -> bool {
        fail::fail_point!(name, |_| true);
        false
    };
    configured()
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn fires(_name: &'static str) -> bool {
    false
}
