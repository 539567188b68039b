//! Generates the owner's own gRPC service (proto/owner.proto) with Debian's
//! `protoc`, as crates/cri-api does for CRI.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/owner.proto");
    tonic_build::configure().compile_protos(&["proto/owner.proto"], &["proto"])?;
    Ok(())
}
