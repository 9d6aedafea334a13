//! Generates the gRPC code and the descriptor set served by reflection from
//! `proto/upscale.proto`, with a pure-Rust protobuf compiler: no system `protoc` needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/upscale.proto");
    let fds = protox::compile(["proto/upscale.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("upscaler_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
