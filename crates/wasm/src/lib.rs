//! The wasm runtime's engine process: every WebAssembly container of one pod
//! in one process, one wasmtime `Store` each (the pod's controller drives it
//! over `vmrun_pod::wasm::protocol`).
//!
//! One `Engine` per process with the pooling allocator and copy-on-write
//! memory images; modules and components compiled once per content digest
//! and kept on disk ([`cache`]); `InstancePre`s kept for restarts; epoch
//! interruption for CPU shares and stopping ([`limits`]).

pub mod cache;
pub mod container;
pub mod engine;
pub mod limits;
pub mod server;
