//! Wasm OCI artifacts built from a `.wasm` file (`vmrun image build-wasm`): the layout runwasi
//! and containerd accept — an OCI image manifest whose config is
//! `application/vnd.wasm.config.v0+json` and whose single layer is the raw module or component
//! (`application/wasm`).
//!
//! The documents are deterministic (no timestamps), so building the same file twice yields the
//! same image id and manifest digest.

use std::path::Path;

use serde_json::json;

use crate::error::{BlobError, BuildError};
use crate::manifest::{
    parse_image_config, Descriptor, Manifest, OCI_MANIFEST, WASM_CONFIG, WASM_LAYER,
};
use crate::reference::parse_reference;
use crate::store::{sha256_digest, ImageRecord, LayerRecord};
use crate::{Image, ImageStore};

/// The WebAssembly binary magic, `\0asm`.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// Version field of a core module (version 1).
const CORE_VERSION: [u8; 4] = [0x01, 0x00, 0x00, 0x00];
/// Version and layer fields of a component (version 0x0d, layer 1).
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];

/// What a `.wasm` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A core module: WASI preview 1 (`os: wasip1`).
    Module,
    /// A component: WASI preview 2 (`os: wasip2`).
    Component,
}

impl WasmKind {
    /// The artifact's `os`.
    pub fn os(self) -> &'static str {
        match self {
            WasmKind::Module => "wasip1",
            WasmKind::Component => "wasip2",
        }
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Tells a core module from a component by the 8-byte preamble; anything else is described
/// (for the error message).
pub fn wasm_kind(bytes: &[u8]) -> Result<WasmKind, String> {
    if bytes.len() < 8 {
        return Err(format!(
            "only {} bytes ({}), a wasm binary starts with 8 (\\0asm and a version)",
            bytes.len(),
            hex_bytes(bytes)
        ));
    }
    if &bytes[..4] != WASM_MAGIC {
        return Err(format!(
            "starts with {}, not the wasm magic 00 61 73 6d (\\0asm)",
            hex_bytes(&bytes[..4])
        ));
    }
    match <[u8; 4]>::try_from(&bytes[4..8]) {
        Ok(CORE_VERSION) => Ok(WasmKind::Module),
        Ok(COMPONENT_VERSION) => Ok(WasmKind::Component),
        _ => Err(format!(
            "wasm magic followed by version {}, neither 01 00 00 00 (core module) nor \
             0d 00 01 00 (component)",
            hex_bytes(&bytes[4..8])
        )),
    }
}

impl ImageStore {
    /// Reads the `.wasm` file at `path`, wraps it as a Wasm OCI artifact (config + one
    /// `application/wasm` layer + manifest) and stores it under `reference`. The layer is
    /// unpacked as `/module.wasm`, the image's entrypoint.
    pub fn build_wasm(&self, path: &Path, reference: &str) -> Result<Image, BuildError> {
        let name = parse_reference(reference)?.whole();
        let io_err = |source| BuildError::Io {
            path: path.to_path_buf(),
            source,
        };
        let wasm = std::fs::read(path).map_err(io_err)?;
        let kind = wasm_kind(&wasm).map_err(|found| BuildError::NotWasm {
            path: path.to_path_buf(),
            found,
        })?;
        let store_err = |source| BuildError::Store {
            path: path.to_path_buf(),
            source,
        };
        let blob_err = |e: BlobError| match e {
            BlobError::Store(source) => store_err(source),
            other => BuildError::Invalid {
                path: path.to_path_buf(),
                reason: format!("storing a blob: {other:?}"),
            },
        };

        let layer = Descriptor {
            media_type: WASM_LAYER.to_string(),
            digest: sha256_digest(&wasm),
            size: wasm.len() as i64,
            ..Descriptor::default()
        };
        let config = json!({
            "architecture": "wasm",
            "os": kind.os(),
            "layerDigests": [layer.digest],
        });
        let config = serde_json::to_vec(&config).map_err(|e| BuildError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: OCI_MANIFEST.to_string(),
            config: Descriptor {
                media_type: WASM_CONFIG.to_string(),
                digest: sha256_digest(&config),
                size: config.len() as i64,
                ..Descriptor::default()
            },
            layers: vec![layer],
        };
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| BuildError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let manifest_digest = sha256_digest(&manifest_bytes);
        // The same interpretation a pull of this artifact gets.
        let parsed =
            parse_image_config(&manifest.config, &manifest.layers, &config).map_err(|reason| {
                BuildError::Invalid {
                    path: path.to_path_buf(),
                    reason,
                }
            })?;

        let _lock = self.lock_content().map_err(store_err)?;
        let layer = &manifest.layers[0];
        self.write_blob_bytes(&layer.digest, &wasm)
            .map_err(blob_err)?;
        self.write_blob_bytes(&manifest.config.digest, &config)
            .map_err(blob_err)?;
        self.write_blob_bytes(&manifest_digest, &manifest_bytes)
            .map_err(blob_err)?;
        self.ensure_layer(
            &layer.digest,
            &parsed.diff_ids[0],
            parsed.wasm_files[0].as_deref(),
        )
        .map_err(|source| BuildError::Layer {
            path: path.to_path_buf(),
            digest: layer.digest.clone(),
            source,
        })?;
        let record = ImageRecord {
            id: manifest.config.digest.clone(),
            manifest_digest,
            config: parsed.config,
            size: (config.len() + wasm.len()) as u64,
            layers: vec![LayerRecord {
                digest: layer.digest.clone(),
                diff_id: parsed.diff_ids[0].clone(),
                media_type: layer.media_type.clone(),
                size: wasm.len() as u64,
            }],
        };
        self.commit_image(record, &[name]).map_err(store_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_modules_from_components() {
        assert_eq!(wasm_kind(b"\0asm\x01\0\0\0").unwrap(), WasmKind::Module);
        assert_eq!(
            wasm_kind(b"\0asm\x0d\0\x01\0rest").unwrap(),
            WasmKind::Component
        );
        assert_eq!(WasmKind::Component.os(), "wasip2");
        let elf = wasm_kind(b"\x7fELF\x02\x01\x01\0").unwrap_err();
        assert!(elf.contains("7f 45 4c 46"), "{elf}");
        let short = wasm_kind(b"\0as").unwrap_err();
        assert!(short.contains("only 3 bytes"), "{short}");
        let version = wasm_kind(b"\0asm\x02\0\0\0").unwrap_err();
        assert!(version.contains("02 00 00 00"), "{version}");
    }
}
