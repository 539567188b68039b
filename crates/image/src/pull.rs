//! Pulling over the OCI distribution API with `oci-client`.
//!
//! oci-client does the HTTP, auth challenges and token handling; manifest interpretation
//! (index → linux/amd64, Docker v2 vs OCI), digest checks and storage are ours, so that imports
//! and pulls share one code path from "blobs are in the store" onwards.

use std::time::Duration;

use futures::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::error::{BlobError, PullError, StoreError};
use crate::manifest::{
    is_layer_media_type, parse_image_config, parse_manifest, platforms_of, select_platform,
    Descriptor, Manifest, Parsed, ACCEPTED_MANIFESTS, MAX_JSON_SIZE,
};
use crate::reference::{is_local_registry, parse_reference};
use crate::store::{sha256_digest, sha256_hex, ImageRecord, LayerRecord};
use crate::{Image, ImageStore, PullPolicy, PullProgress};

/// Layers fetched and unpacked at the same time.
const PARALLEL_LAYERS: usize = 3;

/// Context of one pull, for error construction.
struct Pull<'a> {
    store: &'a ImageStore,
    client: Client,
    auth: RegistryAuth,
    name: String,
    progress: &'a dyn PullProgress,
}

impl ImageStore {
    /// Pulls `reference` (normalized Kubernetes-style) from its registry into the store and
    /// points the reference at it. Layers already in the store are neither downloaded nor
    /// unpacked again.
    pub async fn pull(
        &self,
        reference: &str,
        progress: &dyn PullProgress,
    ) -> Result<Image, PullError> {
        let r = parse_reference(reference)?;
        let name = r.whole();
        let lock = self
            .lock_content_async()
            .await
            .map_err(|source| PullError::Store {
                reference: name.clone(),
                source,
            })?;
        let mut result = Err(PullError::NotPresent {
            reference: name.clone(),
        });
        for (wire, plain_http) in self.endpoints_for(&r) {
            let pull = Pull {
                store: self,
                client: self.client_for(&wire, plain_http),
                auth: self.auth_for(&wire),
                name: name.clone(),
                progress,
            };
            result = pull.run(&wire).await;
            match &result {
                Ok(_) => break,
                Err(e) if wire.registry() != r.registry() => {
                    tracing::warn!("{name}: mirror {}: {e}; trying the next", wire.registry());
                }
                Err(_) => {}
            }
        }
        drop(lock);
        if result.is_err() {
            // Drop whatever the failed pull stored (blobs of a refused layer, temporaries);
            // skipped automatically if other pulls are running.
            if let Err(e) = self.try_gc() {
                tracing::warn!("cleanup after failed pull: {e}");
            }
        }
        result
    }

    /// Kubernetes pull-policy semantics: `IfNotPresent` uses the local image when it is there
    /// (and its layers are intact), `Never` never contacts a registry.
    pub async fn ensure(
        &self,
        reference: &str,
        policy: PullPolicy,
        progress: &dyn PullProgress,
    ) -> Result<Image, PullError> {
        let local = || -> Result<Option<Image>, PullError> {
            let image = self.get(reference).map_err(|source| PullError::Store {
                reference: reference.to_string(),
                source,
            })?;
            Ok(image.filter(|img| img.layers.iter().all(|l| l.is_dir())))
        };
        match policy {
            PullPolicy::Always => self.pull(reference, progress).await,
            PullPolicy::IfNotPresent => match local()? {
                Some(image) => Ok(image),
                None => self.pull(reference, progress).await,
            },
            PullPolicy::Never => local()?.ok_or_else(|| PullError::NotPresent {
                reference: crate::normalize_reference(reference)
                    .unwrap_or_else(|_| reference.to_string()),
            }),
        }
    }

    /// Where `r` is fetched from, in order: its registry's mirrors (with
    /// whether they speak plain HTTP), then the registry itself.
    fn endpoints_for(&self, r: &Reference) -> Vec<(Reference, bool)> {
        let mut endpoints = Vec::new();
        for endpoint in self
            .registries
            .mirrors
            .get(r.registry())
            .into_iter()
            .flatten()
        {
            let plain = endpoint.starts_with("http://");
            let host = endpoint
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/');
            let wire = match (r.digest(), r.tag()) {
                (Some(digest), _) => Reference::with_digest(
                    host.to_string(),
                    r.repository().to_string(),
                    digest.to_string(),
                ),
                (None, tag) => Reference::with_tag(
                    host.to_string(),
                    r.repository().to_string(),
                    tag.unwrap_or("latest").to_string(),
                ),
            };
            endpoints.push((wire, plain));
        }
        endpoints.push((r.clone(), false));
        endpoints
    }

    pub(crate) fn client_for(&self, r: &Reference, plain: bool) -> Client {
        let mut plain_http: Vec<String> = self
            .registries
            .insecure
            .iter()
            .map(|h| {
                h.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect();
        let registry = r.resolve_registry();
        if plain || is_local_registry(registry) {
            plain_http.push(registry.to_string());
        }
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http),
            // Index resolution is ours (see `select_platform`).
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            ..ClientConfig::default()
        })
    }

    pub(crate) fn auth_for(&self, r: &Reference) -> RegistryAuth {
        let mut keys = vec![r.registry(), r.resolve_registry()];
        if r.registry() == "docker.io" {
            keys.extend([
                "index.docker.io",
                "registry-1.docker.io",
                "https://index.docker.io/v1/",
            ]);
        }
        keys.iter()
            .find_map(|k| self.registries.auth.get(*k))
            .map_or(RegistryAuth::Anonymous, |c| {
                RegistryAuth::Basic(c.username.clone(), c.password.clone())
            })
    }
}

impl Pull<'_> {
    fn registry_err(&self, err: OciDistributionError) -> PullError {
        if let OciDistributionError::DigestError(DigestError::VerificationError {
            expected,
            actual,
        }) = &err
        {
            return PullError::DigestMismatch {
                reference: self.name.clone(),
                digest: expected.clone(),
                actual: actual.clone(),
            };
        }
        PullError::Registry {
            reference: self.name.clone(),
            message: describe(&err),
        }
    }

    fn manifest_err(&self, reason: impl Into<String>) -> PullError {
        PullError::Manifest {
            reference: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn blob_err(&self, err: BlobError) -> PullError {
        let reference = self.name.clone();
        match err {
            BlobError::Mismatch { expected, actual } => PullError::DigestMismatch {
                reference,
                digest: expected,
                actual,
            },
            BlobError::BadDigest(d) => PullError::Manifest {
                reference,
                reason: format!("invalid digest {d:?} (only sha256 is supported)"),
            },
            BlobError::TooLarge { expected } => PullError::Manifest {
                reference,
                reason: format!("blob larger than its descriptor says ({expected} bytes)"),
            },
            BlobError::Store(source) => PullError::Store { reference, source },
        }
    }

    /// As [`Self::blob_err`], naming the blob a failed store write was for (a full disk).
    fn blob_write_err(&self, digest: &str, err: BlobError) -> PullError {
        match err {
            BlobError::Store(source) => PullError::BlobStore {
                reference: self.name.clone(),
                digest: digest.to_string(),
                source,
            },
            other => self.blob_err(other),
        }
    }

    fn check_digest(&self, digest: &str) -> Result<(), PullError> {
        match sha256_hex(digest) {
            Some(_) => Ok(()),
            None => Err(self.blob_err(BlobError::BadDigest(digest.to_string()))),
        }
    }

    async fn fetch_manifest(&self, r: &Reference) -> Result<(Vec<u8>, String), PullError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(r, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.registry_err(e))?;
        let digest = sha256_digest(&bytes);
        if let Some(expected) = r.digest() {
            if expected != digest {
                return Err(PullError::DigestMismatch {
                    reference: self.name.clone(),
                    digest: expected.to_string(),
                    actual: digest,
                });
            }
        }
        Ok((bytes.to_vec(), digest))
    }

    /// Resolves the reference to a platform image manifest: (manifest bytes, digest, parsed).
    async fn resolve(&self, r: &Reference) -> Result<(Vec<u8>, String, Manifest), PullError> {
        let (mut bytes, mut digest) = self.fetch_manifest(r).await?;
        // Index → manifest, allowing one level of nesting (index of indexes exists in the wild).
        for _ in 0..3 {
            match parse_manifest(&bytes).map_err(|e| self.manifest_err(e))? {
                Parsed::Manifest(m) => return Ok((bytes, digest, m)),
                Parsed::Index(entries) => {
                    let entry = select_platform(&entries).ok_or_else(|| {
                        self.manifest_err(format!(
                            "no linux/amd64 image in the index (has: {})",
                            platforms_of(&entries)
                        ))
                    })?;
                    self.check_digest(&entry.digest)?;
                    let platform = entry.platform.as_ref().map_or("default".to_string(), |p| {
                        format!("{}/{}", p.os, p.architecture)
                    });
                    self.progress.message(&format!(
                        "{}: resolved {platform} manifest {}",
                        self.name, entry.digest
                    ));
                    (bytes, digest) = self
                        .fetch_manifest(&r.clone_with_digest(entry.digest.clone()))
                        .await?;
                }
            }
        }
        Err(self.manifest_err("image indexes nested too deeply"))
    }

    async fn run(&self, r: &Reference) -> Result<Image, PullError> {
        let (manifest_bytes, manifest_digest, manifest) = self.resolve(r).await?;
        let repo = r.clone_with_digest(manifest_digest.clone());

        self.check_digest(&manifest.config.digest)?;
        if manifest.config.size().unwrap_or(0) > MAX_JSON_SIZE {
            return Err(self.manifest_err("image config is implausibly large"));
        }
        for layer in &manifest.layers {
            self.check_digest(&layer.digest)?;
            if !is_layer_media_type(&layer.media_type) {
                return Err(self.manifest_err(format!(
                    "layer {} has unsupported media type {:?} (not a container image?)",
                    layer.digest, layer.media_type
                )));
            }
        }

        self.fetch_blob(&repo, &manifest.config, false).await?;
        let config_bytes = self
            .store
            .read_blob(&manifest.config.digest, MAX_JSON_SIZE)
            .map_err(|e| self.blob_err(e))?;
        let parsed = parse_image_config(&manifest.config, &manifest.layers, &config_bytes)
            .map_err(|e| self.manifest_err(format!("config {}: {e}", manifest.config.digest)))?;
        if parsed.diff_ids.len() != manifest.layers.len() {
            return Err(self.manifest_err(format!(
                "manifest has {} layers but the config lists {} diff_ids",
                manifest.layers.len(),
                parsed.diff_ids.len()
            )));
        }
        for d in &parsed.diff_ids {
            self.check_digest(d)?;
        }
        self.store
            .write_blob_bytes(&manifest_digest, &manifest_bytes)
            .map_err(|e| self.blob_err(e))?;

        let layers = manifest
            .layers
            .iter()
            .zip(&parsed.diff_ids)
            .zip(&parsed.wasm_files);
        futures::stream::iter(layers)
            .map(|((layer, diff_id), wasm)| {
                self.fetch_layer(&repo, layer, diff_id, wasm.as_deref())
            })
            .buffer_unordered(PARALLEL_LAYERS)
            // Every layer is waited for, failed or not: an unpack runs on a
            // blocking thread that dropping its future does not stop, and it
            // must not write into the store after the pull has returned (and
            // the cleanup of a failed pull swept the store).
            .collect::<Vec<Result<(), PullError>>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, PullError>>()?;

        let record = ImageRecord {
            id: manifest.config.digest.clone(),
            manifest_digest,
            config: parsed.config,
            size: config_bytes.len() as u64
                + manifest
                    .layers
                    .iter()
                    .filter_map(Descriptor::size)
                    .sum::<u64>(),
            layers: manifest
                .layers
                .iter()
                .zip(parsed.diff_ids)
                .map(|(l, diff_id)| LayerRecord {
                    digest: l.digest.clone(),
                    diff_id,
                    media_type: l.media_type.clone(),
                    size: l.size().unwrap_or(0),
                })
                .collect(),
        };
        let image = self
            .store
            .commit_image(record, std::slice::from_ref(&self.name))
            .map_err(|source| PullError::Store {
                reference: self.name.clone(),
                source,
            })?;
        self.progress
            .message(&format!("{}: pulled image {}", self.name, image.id));
        Ok(image)
    }

    async fn fetch_layer(
        &self,
        repo: &Reference,
        layer: &Descriptor,
        diff_id: &str,
        wasm_file: Option<&str>,
    ) -> Result<(), PullError> {
        // An unpacked layer is named by its diff_id, which the (digest-verified) config commits
        // to, so an existing one is the right content however it was compressed or obtained.
        if self.store.layer_path(diff_id).is_some_and(|p| p.is_dir()) {
            self.progress
                .message(&format!("{}: layer already present", layer.digest));
            return Ok(());
        }
        self.fetch_blob(repo, layer, true).await?;
        let store = self.store.clone();
        let (digest, diff) = (layer.digest.clone(), diff_id.to_string());
        let wasm = wasm_file.map(str::to_string);
        let unpacked = tokio::task::spawn_blocking(move || {
            store.ensure_layer(&digest, &diff, wasm.as_deref())
        })
        .await
        .map_err(|e| PullError::Store {
            reference: self.name.clone(),
            source: StoreError::Io {
                path: self.store.root().join("tmp"),
                source: std::io::Error::other(e),
            },
        })?;
        unpacked.map_err(|source| PullError::Layer {
            reference: self.name.clone(),
            digest: layer.digest.clone(),
            source,
        })?;
        self.progress.finished(&layer.digest);
        Ok(())
    }

    /// Downloads a blob into the store unless it is already there, verifying its digest.
    async fn fetch_blob(
        &self,
        repo: &Reference,
        desc: &Descriptor,
        report: bool,
    ) -> Result<(), PullError> {
        if self.store.has_blob(&desc.digest) {
            return Ok(());
        }
        if report {
            self.progress.started(&desc.digest, desc.size());
        }
        let mut stream = self
            .client
            .pull_blob_stream(repo, desc.digest.as_str())
            .await
            .map_err(|e| self.registry_err(e))?;
        let written_err = |e| self.blob_write_err(&desc.digest, e);
        let mut writer = self.store.blob_writer().map_err(written_err)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| self.stream_err(&desc.digest, writer.written(), desc.size(), e))?;
            writer.write(&chunk).map_err(written_err)?;
            if report {
                self.progress.advanced(&desc.digest, chunk.len() as u64);
            }
            // A registry streaming more than the descriptor promised is lying or broken; stop
            // before it fills the disk.
            if let Some(size) = desc.size() {
                if writer.written() > size {
                    return Err(self.blob_err(BlobError::TooLarge { expected: size }));
                }
            }
        }
        // A response that ends early but cleanly (a wrong Content-Length) is as short as one
        // cut off; said so before the digest check would call it other content.
        if let Some(size) = desc.size().filter(|size| writer.written() < *size) {
            return Err(self.short_blob(&desc.digest, writer.written(), size));
        }
        writer
            .commit(self.store, &desc.digest)
            .map_err(written_err)?;
        Ok(())
    }

    fn short_blob(&self, digest: &str, received: u64, size: u64) -> PullError {
        PullError::Registry {
            reference: self.name.clone(),
            message: format!("blob {digest}: the registry sent {received} of its {size} bytes"),
        }
    }

    fn stream_err(
        &self,
        digest: &str,
        received: u64,
        size: Option<u64>,
        err: std::io::Error,
    ) -> PullError {
        if let Some(DigestError::VerificationError { actual, .. }) =
            err.get_ref().and_then(|e| e.downcast_ref::<DigestError>())
        {
            if let Some(size) = size.filter(|size| received < *size) {
                return self.short_blob(digest, received, size);
            }
            return PullError::DigestMismatch {
                reference: self.name.clone(),
                digest: digest.to_string(),
                actual: actual.clone(),
            };
        }
        PullError::Registry {
            reference: self.name.clone(),
            message: match size {
                Some(size) => format!(
                    "reading blob {digest} (after {received} of {size} bytes): {}",
                    chain(&err)
                ),
                None => format!(
                    "reading blob {digest} (after {received} bytes): {}",
                    chain(&err)
                ),
            },
        }
    }
}

/// A one-line description of a registry error: the registry's own error codes for API errors
/// (`manifest unknown`), the cause chain for transport errors (`connection refused`).
pub(crate) fn describe(err: &OciDistributionError) -> String {
    match err {
        OciDistributionError::RegistryError { envelope, .. } => {
            let msgs: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| {
                    let code = words(&format!("{:?}", e.code));
                    let msg = e.message.trim();
                    if msg.is_empty() || msg.eq_ignore_ascii_case(&code) {
                        code
                    } else {
                        format!("{code} ({msg})")
                    }
                })
                .collect();
            if msgs.is_empty() {
                "registry returned an error".to_string()
            } else {
                msgs.join("; ")
            }
        }
        OciDistributionError::UnauthorizedError { .. } => {
            "unauthorized: authentication required (check [registries.auth] credentials)"
                .to_string()
        }
        OciDistributionError::ServerError { code, message, .. } => {
            let first = message.lines().next().unwrap_or("").trim();
            let first: String = first.chars().take(200).collect();
            if first.is_empty() {
                format!("registry returned HTTP {code}")
            } else {
                format!("registry returned HTTP {code}: {first}")
            }
        }
        other => chain(other),
    }
}

/// `ManifestUnknown` → `manifest unknown`.
fn words(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// An error and its sources on one line, skipping sources already contained in the text.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_words() {
        assert_eq!(words("ManifestUnknown"), "manifest unknown");
        assert_eq!(words("NameUnknown"), "name unknown");
    }
}
