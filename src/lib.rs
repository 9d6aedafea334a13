//! upscaler: Real-ESRGAN image upscaling in pure Rust, as a library, a CLI and a gRPC service.
//!
//! `model` holds the networks and tiled inference (candle only), `imaging` the image codecs
//! and pixel conversions (image crates only), and `pipeline` joins the two with
//! `RealESRGANer.enhance` semantics. `store` and `locks` are the service's backends, `tasks`
//! its core, and `api` the protocol layer: gRPC, gRPC-Web and the HTTP routes with the
//! built-in page, all on one port.

pub mod api;
pub mod bench;
pub mod client;
pub mod config;
pub mod doctor;
pub mod events;
mod failpoint;
pub mod imaging;
pub mod locks;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod store;
pub mod tasks;

pub use api::{run, serve, ServeError};
pub use config::Settings;
