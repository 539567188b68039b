//! Test programs for the wasm runtime.
//!
//! Two kinds:
//!
//! - Hand-written WebAssembly text modules (WASI preview 1 core modules), assembled with the
//!   `wat` crate. They are tiny and each exercises one behaviour of the runtime (exit codes,
//!   traps, memory limits, missing exports, unknown imports, undecodable bytes).
//! - Rust programs in `tests/wasm-programs/` (a standalone cargo project outside the
//!   workspace), built on first use for `wasm32-wasip1` (a core module with `_start`) or
//!   `wasm32-wasip2` (a component): [`wasm_box_p1`], [`wasm_box_p2`], [`http_server_p2`].
//!   See `tests/wasm-programs/README.md` for their commands.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `tests/wasm-programs/`, the cargo project of the Rust test programs.
fn programs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("wasm-programs")
}

/// Builds `bin` of `tests/wasm-programs/` in release mode for `target` into
/// `<repo>/target/wasm-programs` and returns the `.wasm` file's bytes.
///
/// Concurrent builds (several test processes) are serialised by cargo's lock on the target
/// directory, and an up-to-date build is a no-op, so every process just runs cargo. Panics
/// with cargo's output if the build fails.
fn build(target: &str, bin: &str) -> Vec<u8> {
    let dir = programs_dir();
    let repo = dir
        .parent()
        .and_then(Path::parent)
        .expect("tests crate sits in the repository");
    let target_dir = repo.join("target").join("wasm-programs");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--quiet")
        .args(["--target", target, "--bin", bin])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(&dir);
    // Settings inherited from the outer build (a test run under `cargo test`, CI's RUSTFLAGS,
    // a cross target, a wrapper) that do not apply to a wasm build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_PRIMARY_PACKAGE",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        command.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        if var.starts_with("CARGO_TARGET_") && var != "CARGO_TARGET_DIR" {
            command.env_remove(&*var);
        }
    }
    let output = command.output().unwrap_or_else(|e| {
        panic!("wasm_programs: running cargo to build {bin} for {target}: {e}")
    });
    if !output.status.success() {
        panic!(
            "wasm_programs: building {bin} for {target} ({}) failed ({}); is the target \
             installed? `scripts/setup` adds wasm32-wasip1 and wasm32-wasip2 \
             (`rustup target add {target}`).\n{}{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    let wasm = target_dir
        .join(target)
        .join("release")
        .join(format!("{bin}.wasm"));
    std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("wasm_programs: reading {}: {e}", wasm.display()))
}

/// `wasm-box` built for `wasm32-wasip1`: a WASI p1 core module with `_start`, a multi-call
/// test tool (`wasm-box COMMAND ARGS...`; commands `echo`, `env`, `cat`, `write`, `ls`, `exit`,
/// `sleep`, `spin`, `alloc`, `clock`, `stderr`, see `tests/wasm-programs/src/bin/wasm-box.rs`).
/// Built once per process.
pub fn wasm_box_p1() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| build("wasm32-wasip1", "wasm-box"))
}

/// `wasm-box` built for `wasm32-wasip2`: the same tool as [`wasm_box_p1`] as a WASI p2
/// component (`wasi:cli/command`), which also has `serve-once PORT [TEXT]`. Exit codes other
/// than 0 arrive as 1 (`wasi:cli/exit` 0.2 carries only ok/err). Built once per process.
pub fn wasm_box_p2() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| build("wasm32-wasip2", "wasm-box"))
}

/// `http-server PORT [TEXT]` built for `wasm32-wasip2` (a `wasi:cli/command` component): binds
/// 0.0.0.0:PORT, prints `listening on PORT`, then answers every request with
/// `HTTP/1.0 200 OK`, `Content-Type: text/plain` and TEXT (default `hello from wasm\n`) and
/// closes the connection, forever. Built once per process.
pub fn http_server_p2() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| build("wasm32-wasip2", "http-server"))
}

/// Assembles `text`; the modules here are fixed, so a failure is a bug in this file.
fn assemble(name: &str, text: &str) -> Vec<u8> {
    match wat::parse_str(text) {
        Ok(bytes) => bytes,
        Err(e) => panic!("wasm_programs::{name}: invalid WAT: {e}"),
    }
}

/// WASI p1 imports and a one-page memory shared by the WAT modules. Memory layout: an iovec at
/// 0 (pointer, length), the `nwritten` result at 16, message text from 32.
const PRELUDE: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; Writes `len` bytes at `ptr` to fd 1 (errors ignored).
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16))))
"#;

fn module_with_prelude(body: &str) -> String {
    format!("(module {PRELUDE} {body})")
}

/// A WASI p1 module whose `_start` writes `hello from wat\n` to stdout (`fd_write` on fd 1)
/// and returns, i.e. exits 0.
pub fn hello_wat() -> Vec<u8> {
    assemble(
        "hello_wat",
        &module_with_prelude(
            r#"
  (data (i32.const 32) "hello from wat\n")
  (func (export "_start")
    (call $print (i32.const 32) (i32.const 15)))
"#,
        ),
    )
}

/// A WASI p1 module whose `_start` calls `proc_exit(code)` without printing anything.
pub fn exit_code_wat(code: i32) -> Vec<u8> {
    assemble(
        "exit_code_wat",
        &module_with_prelude(&format!(
            r#"
  (func (export "_start")
    (call $proc_exit (i32.const {code})))
"#
        )),
    )
}

/// A WASI p1 module whose `_start` writes `about to trap\n` to stdout, then executes
/// `unreachable` (a wasm trap, not an exit code).
pub fn trap_wat() -> Vec<u8> {
    assemble(
        "trap_wat",
        &module_with_prelude(
            r#"
  (data (i32.const 32) "about to trap\n")
  (func (export "_start")
    (call $print (i32.const 32) (i32.const 14))
    unreachable)
"#,
        ),
    )
}

/// A WASI p1 module whose `_start` writes `growing\n` to stdout, then grows its memory by 16
/// pages (1 MiB) at a time until `memory.grow` returns -1, then calls `proc_exit(42)`.
///
/// Without a memory limit it grows to 4 GiB (the wasm32 maximum) before exiting 42; the
/// runtime's limiter is expected to stop it earlier (`memory.grow` failing leads to exit 42;
/// a limiter that traps instead ends it with a trap).
pub fn memory_bomb_wat() -> Vec<u8> {
    assemble(
        "memory_bomb_wat",
        &module_with_prelude(
            r#"
  (data (i32.const 32) "growing\n")
  (func (export "_start")
    (call $print (i32.const 32) (i32.const 8))
    (block $failed
      (loop $grow
        (br_if $failed (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
        (br $grow)))
    (call $proc_exit (i32.const 42)))
"#,
        ),
    )
}

/// A WASI p1 module whose `_start` spins forever (`loop br 0`) without any host call, so only
/// epoch interruption or fuel (or killing the process) can stop it.
pub fn spin_wat() -> Vec<u8> {
    assemble(
        "spin_wat",
        r#"
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $forever
      (br $forever))))
"#,
    )
}

/// A valid module that exports only `memory`: no `_start` (nor any other function), so it
/// cannot be run as a WASI command.
pub fn no_start_wat() -> Vec<u8> {
    assemble(
        "no_start_wat",
        r#"
(module
  (memory (export "memory") 1))
"#,
    )
}

/// A module with a `_start` that imports the function `not_in_wasi` from module `env`, which
/// no WASI host provides, so instantiation (linking) fails.
pub fn bad_import_wat() -> Vec<u8> {
    assemble(
        "bad_import_wat",
        r#"
(module
  (import "env" "not_in_wasi" (func $missing))
  (memory (export "memory") 1)
  (func (export "_start")
    (call $missing)))
"#,
    )
}

/// Bytes that start like a core module (`\0asm` and version 1) followed by garbage (an invalid
/// section id), so decoding or compiling them fails.
pub fn broken_wasm() -> Vec<u8> {
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.extend_from_slice(&[0xff, 0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x42]);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORE_MAGIC: &[u8] = b"\0asm\x01\0\0\0";
    const COMPONENT_MAGIC: &[u8] = b"\0asm\x0d\0\x01\0";

    #[test]
    fn wat_modules_assemble_to_core_modules() {
        let modules = [
            ("hello", hello_wat()),
            ("exit_code 0", exit_code_wat(0)),
            ("exit_code 7", exit_code_wat(7)),
            ("exit_code -1", exit_code_wat(-1)),
            ("trap", trap_wat()),
            ("memory_bomb", memory_bomb_wat()),
            ("spin", spin_wat()),
            ("no_start", no_start_wat()),
            ("bad_import", bad_import_wat()),
        ];
        for (name, bytes) in modules {
            assert!(bytes.starts_with(CORE_MAGIC), "{name}: {bytes:02x?}");
        }
    }

    #[test]
    fn exit_codes_differ() {
        assert_ne!(exit_code_wat(3), exit_code_wat(4));
    }

    #[test]
    fn wasm_box_p1_is_a_core_module() {
        assert!(wasm_box_p1().starts_with(CORE_MAGIC));
    }

    #[test]
    fn wasm_box_p2_is_a_component() {
        assert!(wasm_box_p2().starts_with(COMPONENT_MAGIC));
    }

    #[test]
    fn http_server_p2_is_a_component() {
        assert!(http_server_p2().starts_with(COMPONENT_MAGIC));
    }

    #[test]
    fn broken_wasm_has_magic_but_is_not_valid_wat_output() {
        let bytes = broken_wasm();
        assert!(bytes.starts_with(CORE_MAGIC));
        assert!(bytes.len() > CORE_MAGIC.len());
        // The byte after the header is not a known section id.
        assert_eq!(bytes[CORE_MAGIC.len()], 0xff);
    }
}
