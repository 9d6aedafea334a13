//! upscaler: Real-ESRGAN image upscaling in pure Rust.
//!
//! `model` holds the networks and tiled inference (candle only), `imaging` the image codecs
//! and pixel conversions (image crates only), and `pipeline` joins the two with
//! `RealESRGANer.enhance` semantics.

pub mod bench;
pub mod imaging;
pub mod model;
pub mod pipeline;
