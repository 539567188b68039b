//! Which file of an image a wasm container runs: the entry point
//! (`command`, else the image's Entrypoint) looked up through the image's
//! layers, top layer first, and told apart as a core module or a component
//! by its header.

use std::io::Read;
use std::path::{Path, PathBuf};

/// `\0asm`, then the version: 1 for core modules; components carry version
/// 0x0d and layer 1.
const MAGIC: &[u8; 4] = b"\0asm";
const MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WasmKind {
    /// A core module: WASI preview 1, entry `_start`.
    Module,
    /// A component: WASI preview 2, entry `wasi:cli/run`.
    Component,
}

impl WasmKind {
    /// The kind of a binary from its first 8 bytes, None if not WebAssembly.
    pub fn of(header: &[u8]) -> Option<WasmKind> {
        if header.len() < 8 || &header[..4] != MAGIC {
            return None;
        }
        let version = &header[4..8];
        if version == MODULE_VERSION {
            Some(WasmKind::Module)
        } else if version == COMPONENT_VERSION {
            Some(WasmKind::Component)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmEntry {
    /// The file on the host (inside one of the image's layers).
    pub host_path: PathBuf,
    pub kind: WasmKind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("image {image:?} names no command to run (no Entrypoint and no container command)")]
    NoCommand { image: String },
    #[error("image {image:?} has no file {path:?} (its entry point)")]
    NotFound { image: String, path: String },
    #[error("image {image:?} is not a WebAssembly image: its entry point {path:?} is {what}")]
    NotWasm {
        image: String,
        path: String,
        what: String,
    },
    #[error("image {image:?}: reading {path:?}: {message}")]
    Read {
        image: String,
        path: String,
        message: String,
    },
}

/// Finds `argv0` in `layers` (bottom first) and checks it is WebAssembly.
pub fn find_entry(image: &str, layers: &[PathBuf], argv0: &str) -> Result<WasmEntry, EntryError> {
    if argv0.is_empty() {
        return Err(EntryError::NoCommand {
            image: image.to_string(),
        });
    }
    let host_path = lookup(layers, argv0, 0).ok_or_else(|| EntryError::NotFound {
        image: image.to_string(),
        path: argv0.to_string(),
    })?;
    let read_err = |e: std::io::Error| EntryError::Read {
        image: image.to_string(),
        path: argv0.to_string(),
        message: e.to_string(),
    };
    // Eight bytes tell wasm from wasm; twenty also name an ELF file's CPU.
    let mut header = Vec::with_capacity(20);
    std::fs::File::open(&host_path)
        .map_err(read_err)?
        .take(20)
        .read_to_end(&mut header)
        .map_err(read_err)?;
    match WasmKind::of(&header) {
        Some(kind) => Ok(WasmEntry { host_path, kind }),
        None => Err(EntryError::NotWasm {
            image: image.to_string(),
            path: argv0.to_string(),
            what: describe(&header),
        }),
    }
}

/// What a file that is not WebAssembly is, from its first bytes.
fn describe(header: &[u8]) -> String {
    if header.starts_with(b"\x7fELF") {
        format!(
            "a native ELF executable{} (an image for a CPU, not for wasm)",
            elf_machine(header)
                .map(|m| format!(" for {m}"))
                .unwrap_or_default()
        )
    } else if header.starts_with(b"#!") {
        "a script".into()
    } else if header.starts_with(MAGIC) {
        format!(
            "WebAssembly of an unsupported version {:02x?}",
            &header[4..header.len().min(8)]
        )
    } else if header.is_empty() {
        "an empty file".into()
    } else {
        format!("not WebAssembly (it starts with {:02x?})", header)
    }
}

/// The CPU an ELF header names (`e_machine`), for the common ones.
fn elf_machine(header: &[u8]) -> Option<&'static str> {
    let bytes: [u8; 2] = header.get(18..20)?.try_into().ok()?;
    // EI_DATA (byte 5): 1 little-endian, 2 big-endian.
    let machine = match header.get(5)? {
        1 => u16::from_le_bytes(bytes),
        2 => u16::from_be_bytes(bytes),
        _ => return None,
    };
    Some(match machine {
        0x03 => "x86 (32-bit)",
        0x08 => "MIPS",
        0x14 => "PowerPC",
        0x15 => "PowerPC 64",
        0x16 => "s390x",
        0x28 => "ARM (32-bit)",
        0x3e => "x86-64",
        0xb7 => "arm64",
        0xf3 => "RISC-V",
        _ => return None,
    })
}

/// The host path of `path` in the merged layers, following symlinks inside
/// the image (never out of it); directories and whiteouts do not count.
fn lookup(layers: &[PathBuf], path: &str, depth: u32) -> Option<PathBuf> {
    if depth > 8 {
        return None;
    }
    let rel = path.trim_start_matches('/');
    for layer in layers.iter().rev() {
        let candidate = layer.join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&candidate) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&candidate).ok()?;
            let target = if target.is_absolute() {
                target
            } else {
                Path::new("/")
                    .join(Path::new(rel).parent().unwrap_or(Path::new("")))
                    .join(target)
            };
            return lookup(layers, &normalize(&target), depth + 1);
        }
        // overlayfs whiteouts are character devices; they hide lower layers.
        return meta.is_file().then_some(candidate);
    }
    None
}

/// `/a/./b/../c` → `/a/c`, never above `/`.
fn normalize(path: &Path) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.to_str().unwrap_or("").split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, data) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        dir
    }

    #[test]
    fn modules_and_components_are_told_apart() {
        assert_eq!(WasmKind::of(b"\0asm\x01\0\0\0rest"), Some(WasmKind::Module));
        assert_eq!(
            WasmKind::of(b"\0asm\x0d\0\x01\0"),
            Some(WasmKind::Component)
        );
        assert_eq!(WasmKind::of(b"\0asm\x02\0\0\0"), None);
        assert_eq!(WasmKind::of(b"\x7fELF\x02\x01\x01\0"), None);
    }

    #[test]
    fn the_top_layer_wins_and_symlinks_stay_inside() {
        let bottom = layer(&[("app.wasm", b"\x7fELF\x02\x01\x01\0")]);
        let top = layer(&[("app.wasm", b"\0asm\x01\0\0\0")]);
        let layers = vec![bottom.path().to_path_buf(), top.path().to_path_buf()];
        let entry = find_entry("img", &layers, "/app.wasm").unwrap();
        assert_eq!(entry.kind, WasmKind::Module);
        assert_eq!(entry.host_path, top.path().join("app.wasm"));
        std::os::unix::fs::symlink("/app.wasm", top.path().join("link")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/passwd", top.path().join("out")).unwrap();
        assert_eq!(
            find_entry("img", &layers, "/link").unwrap().host_path,
            top.path().join("app.wasm")
        );
        assert!(matches!(
            find_entry("img", &layers, "/out"),
            Err(EntryError::NotFound { .. })
        ));
    }

    #[test]
    fn a_native_image_is_named_as_such() {
        let l = layer(&[("bin/sh", b"\x7fELF\x02\x01\x01\0")]);
        let err = find_entry("busybox", &[l.path().to_path_buf()], "/bin/sh").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("busybox") && text.contains("not a WebAssembly image"),
            "{text}"
        );
        assert!(text.contains("ELF"), "{text}");
        let err = find_entry("busybox", &[l.path().to_path_buf()], "/nope.wasm").unwrap_err();
        assert!(matches!(err, EntryError::NotFound { .. }), "{err}");
    }

    #[test]
    fn an_elf_file_is_named_with_its_cpu() {
        let mut arm64 = b"\x7fELF\x02\x01\x01\0".to_vec();
        arm64.resize(18, 0);
        arm64.extend_from_slice(&0xb7u16.to_le_bytes());
        let l = layer(&[("app", &arm64)]);
        let text = find_entry("img", &[l.path().to_path_buf()], "/app")
            .unwrap_err()
            .to_string();
        assert!(text.contains("native ELF executable for arm64"), "{text}");
        // Too short to name a CPU: still an ELF file.
        assert_eq!(elf_machine(b"\x7fELF\x02\x01"), None);
    }
}
