//! Generates `runtime.v1` from proto/api.proto (k8s.io/cri-api v0.36.0,
//! Kubernetes 1.36; wire-compatible with the 1.31–1.35 kubelets) with
//! Debian's `protoc`. One local change: protoc 3.21 does not know the
//! `debug_redact` field option (it only hides AuthConfig secrets from Go's
//! debug printing), so it is removed from the four fields that had it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/api.proto");
    // Default stubs answer `Unimplemented`: a sandbox owner serves only the
    // RuntimeService calls that concern one pod (the daemon serves them all).
    tonic_build::configure()
        .generate_default_stubs(true)
        .compile_protos(&["proto/api.proto"], &["proto"])?;
    Ok(())
}
