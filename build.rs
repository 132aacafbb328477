//! Compiles the Envoy rate limit service's protobuf definitions (`proto/`)
//! into Rust with `protox` (a protobuf compiler in Rust: no `protoc` on the
//! build machine) and `tonic-prost-build` (messages, client and server).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["envoy/service/ratelimit/v3/rls.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
