//! Generates the kiam gRPC code from `src/kiam/kiam.proto` with a pure-Rust protobuf compiler
//! (protox), so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=src/kiam/kiam.proto");
    let descriptors = protox::compile(["src/kiam/kiam.proto"], ["src/kiam"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
