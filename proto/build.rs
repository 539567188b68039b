//! Generates the `vmrun.agent.v1` client and server from proto/agent.proto
//! with Debian's `protoc` (protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    tonic_build::configure().compile_protos(&["proto/agent.proto"], &["proto"])?;
    Ok(())
}
