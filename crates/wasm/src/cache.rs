//! Compiled modules and components on disk, by content digest, under a
//! directory per engine configuration: a new vmrun (another wasmtime or
//! other settings) compiles afresh instead of loading what it cannot run.
//! Loading maps the file, so its code and memory images are page cache
//! shared by every pod on the host.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vmrun_pod::wasm::image::WasmKind;
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not WebAssembly this runtime can run (neither a core module nor a component)"
    )]
    NotWasm { path: PathBuf },
    #[error("{path} is not a valid WebAssembly {kind}: {message}")]
    Invalid {
        path: PathBuf,
        kind: &'static str,
        message: String,
    },
}

/// What was compiled, either kind.
#[derive(Clone)]
pub enum Compiled {
    Module(Module),
    Component(Component),
}

pub struct ModuleCache {
    dir: PathBuf,
}

/// Whether the last load came from the disk cache (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cached,
    Compiled,
}

impl ModuleCache {
    /// The cache for `engine` under `root`; a cache that cannot be made is
    /// skipped (every start compiles), not an error.
    pub fn new(root: &Path, engine: &Engine) -> ModuleCache {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("engine-{:016x}", hasher.finish()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("module cache {}: {e}; compiling every time", dir.display());
        }
        ModuleCache { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads `path` compiled, from the cache when it holds its digest.
    pub fn load(
        &self,
        engine: &Engine,
        path: &Path,
    ) -> Result<(Compiled, String, Source), CacheError> {
        let bytes = std::fs::read(path).map_err(|source| CacheError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let kind = WasmKind::of(&bytes).ok_or_else(|| CacheError::NotWasm {
            path: path.to_path_buf(),
        })?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let cached = self.dir.join(format!("{digest}.cwasm"));
        if cached.is_file() {
            match deserialize(engine, kind, &cached) {
                Ok(c) => return Ok((c, digest, Source::Cached)),
                Err(e) => tracing::warn!("cached {}: {e:#}; compiling again", cached.display()),
            }
        }
        let invalid = |kind: &'static str, e: wasmtime::Error| CacheError::Invalid {
            path: path.to_path_buf(),
            kind,
            message: format!("{e:#}"),
        };
        let (compiled, serialized) = match kind {
            WasmKind::Module => {
                let m = Module::from_binary(engine, &bytes).map_err(|e| invalid("module", e))?;
                let s = m.serialize();
                (Compiled::Module(m), s)
            }
            WasmKind::Component => {
                let c =
                    Component::from_binary(engine, &bytes).map_err(|e| invalid("component", e))?;
                let s = c.serialize();
                (Compiled::Component(c), s)
            }
        };
        match serialized {
            Ok(data) => {
                if let Err(e) = write_atomically(&cached, &data) {
                    tracing::warn!("caching {}: {e}", cached.display());
                } else if let Ok(mapped) = deserialize(engine, kind, &cached) {
                    // The mapped copy shares its pages with other pods.
                    return Ok((mapped, digest, Source::Compiled));
                }
            }
            Err(e) => tracing::warn!("serializing {}: {e:#}", path.display()),
        }
        Ok((compiled, digest, Source::Compiled))
    }
}

fn deserialize(engine: &Engine, kind: WasmKind, path: &Path) -> wasmtime::Result<Compiled> {
    // Every file in the cache directory was produced by `serialize` and
    // renamed into place whole, and only this runtime writes there
    // (root-owned, under vmrun's state); wasmtime still checks the header
    // and the engine's compatibility before using it.
    match kind {
        WasmKind::Module => {
            // SAFETY: `path` is a cache entry written by `Module::serialize` (see above).
            let module = unsafe { Module::deserialize_file(engine, path)? };
            Ok(Compiled::Module(module))
        }
        WasmKind::Component => {
            // SAFETY: `path` is a cache entry written by `Component::serialize` (see above).
            let component = unsafe { Component::deserialize_file(engine, path)? };
            Ok(Compiled::Component(component))
        }
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        crate::engine::create(crate::engine::EngineSizing {
            instances: 2,
            max_memory: 64 << 20,
        })
        .unwrap()
    }

    #[test]
    fn a_module_is_compiled_once_then_loaded_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("m.wasm");
        std::fs::write(
            &wasm,
            wat::parse_str("(module (func (export \"_start\")))").unwrap(),
        )
        .unwrap();
        let engine = engine();
        let cache = ModuleCache::new(&dir.path().join("cache"), &engine);
        let (_, digest, first) = cache.load(&engine, &wasm).unwrap();
        assert_eq!(first, Source::Compiled);
        assert!(cache.dir().join(format!("{digest}.cwasm")).is_file());
        let (_, again, second) = cache.load(&engine, &wasm).unwrap();
        assert_eq!((again, second), (digest, Source::Cached));
    }

    #[test]
    fn a_corrupt_cache_entry_is_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("m.wasm");
        std::fs::write(&wasm, wat::parse_str("(module)").unwrap()).unwrap();
        let engine = engine();
        let cache = ModuleCache::new(&dir.path().join("cache"), &engine);
        let (_, digest, _) = cache.load(&engine, &wasm).unwrap();
        std::fs::write(cache.dir().join(format!("{digest}.cwasm")), b"garbage").unwrap();
        let (_, _, source) = cache.load(&engine, &wasm).unwrap();
        assert_eq!(source, Source::Compiled);
    }

    #[test]
    fn broken_wasm_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("bad.wasm");
        std::fs::write(&wasm, b"\0asm\x01\0\0\0\x01\xff\xff").unwrap();
        let engine = engine();
        let cache = ModuleCache::new(&dir.path().join("cache"), &engine);
        let err = cache.load(&engine, &wasm).err().unwrap().to_string();
        assert!(
            err.contains("bad.wasm") && err.contains("not a valid WebAssembly module"),
            "{err}"
        );
    }
}
