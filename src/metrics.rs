//! Prometheus metrics: names in one place, recorded through the `metrics` facade and served
//! by `metrics-exporter-prometheus` on their own port (`METRICS_ADDR`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `upscaler_requests_total` | counter | `method`, `code` (gRPC) |
//! | `upscaler_request_duration_seconds` | histogram | `method` (gRPC) |
//! | `upscaler_http_requests_total` | counter | `route`, `status` (HTTP routes) |
//! | `upscaler_http_request_duration_seconds` | histogram | `route` (to the response head) |
//! | `upscaler_queue_depth` | gauge | |
//! | `upscaler_running_tasks` | gauge | |
//! | `upscaler_task_duration_seconds` | histogram | `model`, `state` |
//! | `upscaler_tiles_total` | counter (rate = tiles per second) | `model` |
//! | `upscaler_uploaded_bytes_total` | counter | |
//! | `upscaler_served_bytes_total` | counter | |
//! | `upscaler_results_stored` | gauge (as the store saw it at the last sweep) | |
//! | `upscaler_result_bytes_stored` | gauge (as the store saw it at the last sweep) | |
//! | `upscaler_swept_total` | counter | `kind`: `result` (expired), `upload` (orphaned GridFS upload), `source_file` (orphaned file in TEMP_DIR), `result_blob` (bytes of a replaced or deleted result, after the grace period), `task_record` |
//! | `upscaler_cancelled_tasks_total` | counter | `state` (PENDING or STARTED when asked) |

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusBuilder;

pub const REQUESTS: &str = "upscaler_requests_total";
pub const REQUEST_SECONDS: &str = "upscaler_request_duration_seconds";
pub const HTTP_REQUESTS: &str = "upscaler_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "upscaler_http_request_duration_seconds";
pub const QUEUE_DEPTH: &str = "upscaler_queue_depth";
pub const RUNNING_TASKS: &str = "upscaler_running_tasks";
pub const TASK_SECONDS: &str = "upscaler_task_duration_seconds";
pub const TILES: &str = "upscaler_tiles_total";
pub const UPLOADED_BYTES: &str = "upscaler_uploaded_bytes_total";
pub const SERVED_BYTES: &str = "upscaler_served_bytes_total";
pub const RESULTS_STORED: &str = "upscaler_results_stored";
pub const RESULT_BYTES_STORED: &str = "upscaler_result_bytes_stored";
pub const SWEPT: &str = "upscaler_swept_total";
pub const CANCELLED: &str = "upscaler_cancelled_tasks_total";

/// Serves `GET /metrics` on `addr`. One exporter per process.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    const SECONDS: &[f64] = &[
        0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(SECONDS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("metrics endpoint on {addr}: {e}"))
}

/// Counts a call and its duration under its method and final status code.
pub async fn observe<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let start = Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    metrics::counter!(REQUESTS, "method" => method, "code" => format!("{code:?}")).increment(1);
    metrics::histogram!(REQUEST_SECONDS, "method" => method).record(start.elapsed().as_secs_f64());
    result
}

/// Counts an HTTP call under its route pattern (`/tasks/{id}`, not the id) and status.
pub fn observe_http(route: String, status: u16, took: std::time::Duration) {
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_SECONDS, "route" => route).record(took.as_secs_f64());
}
