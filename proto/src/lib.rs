//! Host <-> guest-agent protocol. The gRPC service definitions arrive with the vm runtime.
