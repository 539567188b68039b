//! Pushing an image from the store to a registry with `oci-client`: the stored blobs (layers,
//! config) and the stored manifest, byte for byte, so a pull of the pushed reference yields
//! the same image id and manifest digest.
//!
//! Blobs are read into memory one at a time and pushed whole (oci-client chunks the upload);
//! blobs the registry already has are skipped.

use oci_client::{Reference, RegistryOperation};

use crate::error::{BlobError, PushError};
use crate::manifest::{MAX_JSON_SIZE, OCI_MANIFEST};
use crate::pull::describe;
use crate::reference::parse_reference;
use crate::store::sha256_digest;
use crate::{ImageStore, PullProgress};

impl ImageStore {
    /// Pushes the stored image `reference` (a name, or an id with `to`) to `to`'s registry, or
    /// to its own name's. Plain HTTP for loopback and `insecure` registries, credentials from
    /// [`crate::RegistryConfig::auth`]. Returns the pushed reference, normalized.
    pub async fn push(
        &self,
        reference: &str,
        to: Option<&str>,
        progress: &dyn PullProgress,
    ) -> Result<String, PushError> {
        let image = self
            .get(reference)
            .map_err(|source| PushError::Store {
                reference: reference.to_string(),
                source,
            })?
            .ok_or_else(|| PushError::NotFound {
                reference: reference.to_string(),
            })?;
        let target = match to {
            Some(to) => parse_reference(to)?,
            None => {
                let named = parse_reference(reference)
                    .ok()
                    .filter(|r| image.references.contains(&r.whole()));
                named.ok_or_else(|| PushError::NoTarget {
                    reference: reference.to_string(),
                })?
            }
        };
        let name = target.whole();
        let store_err = |source| PushError::Store {
            reference: name.clone(),
            source,
        };
        let record = self
            .read_record(&image.id)
            .map_err(store_err)?
            .ok_or_else(|| PushError::NotFound {
                reference: reference.to_string(),
            })?;
        // The content lock keeps a concurrent `rm` + GC from deleting blobs mid-push.
        let _lock = self.lock_content_async().await.map_err(store_err)?;
        let manifest = self
            .read_blob(&record.manifest_digest, MAX_JSON_SIZE)
            .map_err(|e| self.stored_err(&name, &record.manifest_digest, e))?;
        let media_type = manifest_media_type(&manifest);

        let client = self.client_for(&target, false);
        let auth = self.auth_for(&target);
        let registry_err = |e: oci_client::errors::OciDistributionError| PushError::Registry {
            reference: name.clone(),
            message: describe(&e),
        };
        client
            .auth(&target, &auth, RegistryOperation::Push)
            .await
            .map_err(registry_err)?;

        let mut blobs: Vec<(String, u64)> = record
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.size))
            .collect();
        blobs.push((record.id.clone(), 0));
        for (digest, size) in &blobs {
            self.push_blob(&client, &target, &name, digest, *size, progress)
                .await?;
        }
        let content_type = media_type.parse().map_err(|_| PushError::Blob {
            reference: name.clone(),
            digest: record.manifest_digest.clone(),
            reason: format!("manifest media type {media_type:?} is not a valid header value"),
        })?;
        // By tag (or the digest the reference names): registries compute the manifest digest
        // from the bytes, which are the stored ones.
        client
            .push_manifest_raw(&target, manifest, content_type)
            .await
            .map_err(registry_err)?;
        progress.message(&format!(
            "{name}: pushed manifest {} (image {})",
            record.manifest_digest, record.id
        ));
        Ok(name)
    }

    fn stored_err(&self, name: &str, digest: &str, e: BlobError) -> PushError {
        match e {
            BlobError::Store(source) => PushError::Store {
                reference: name.to_string(),
                source,
            },
            other => PushError::Blob {
                reference: name.to_string(),
                digest: digest.to_string(),
                reason: format!("{other:?}"),
            },
        }
    }

    async fn push_blob(
        &self,
        client: &oci_client::Client,
        target: &Reference,
        name: &str,
        digest: &str,
        size: u64,
        progress: &dyn PullProgress,
    ) -> Result<(), PushError> {
        let registry_err = |e: oci_client::errors::OciDistributionError| PushError::Registry {
            reference: name.to_string(),
            message: format!("blob {digest}: {}", describe(&e)),
        };
        if client
            .blob_exists(target, digest)
            .await
            .map_err(registry_err)?
        {
            progress.message(&format!("{digest}: already in the registry"));
            return Ok(());
        }
        let path = self
            .blob_path(digest)
            .map_err(|e| self.stored_err(name, digest, e))?;
        progress.started(digest, (size > 0).then_some(size));
        let data = tokio::fs::read(&path)
            .await
            .map_err(|source| PushError::Store {
                reference: name.to_string(),
                source: crate::StoreError::Io { path, source },
            })?;
        // Blobs are trusted under their final names, but a registry would refuse a mismatch
        // with a vaguer message than this.
        let actual = sha256_digest(&data);
        if actual != digest {
            return Err(PushError::Blob {
                reference: name.to_string(),
                digest: digest.to_string(),
                reason: format!("content is {actual} (store damaged; pull the image again)"),
            });
        }
        let len = data.len() as u64;
        client
            .push_blob(target, data, digest)
            .await
            .map_err(registry_err)?;
        progress.advanced(digest, len);
        progress.finished(digest);
        Ok(())
    }
}

/// The `mediaType` a stored manifest declares (OCI's when it declares none).
fn manifest_media_type(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
        .unwrap_or_else(|| OCI_MANIFEST.to_string())
}
