//! Generates the KEDA external scaler's gRPC code from `proto/externalscaler.proto`, with a
//! pure-Rust protobuf compiler (protox), so no `protoc` is needed to build or cross-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/externalscaler.proto");
    let fds = protox::compile(["externalscaler.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
