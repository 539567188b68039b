//! The ImageService, on vmrun's image store (the same one `vmrun image`
//! and `vmrun run` use).

use std::collections::HashMap;

use base64::Engine;
use tonic::{Request, Response, Status};
use vmrun_image::{Credentials, ImageStore, NoProgress, PullError};

use crate::api;
use crate::api::image_service_server::ImageService;

pub struct ImageServiceImpl {
    store: ImageStore,
}

type Reply<T> = Result<Response<T>, Status>;

impl ImageServiceImpl {
    pub fn new(store: ImageStore) -> Self {
        Self { store }
    }
}

fn store_error(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("image store: {e}"))
}

fn image_name(spec: Option<&api::ImageSpec>) -> Result<String, Status> {
    match spec.map(|s| s.image.trim()) {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(Status::invalid_argument("image.image: is required")),
    }
}

/// The image as CRI describes it: tags and digests by repository.
fn cri_image(image: &vmrun_image::Image) -> api::Image {
    let mut repo_tags = Vec::new();
    let mut repo_digests = Vec::new();
    for r in &image.references {
        if let Some((repo, _digest)) = r.split_once('@') {
            repo_digests.push(r.clone());
            let _ = repo;
        } else {
            repo_tags.push(r.clone());
            let repo = match r.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => repo,
                _ => r.as_str(),
            };
            let digest = format!("{repo}@{}", image.manifest_digest);
            if !repo_digests.contains(&digest) {
                repo_digests.push(digest);
            }
        }
    }
    let user = image.config.user.clone().unwrap_or_default();
    let user_part = user.split(':').next().unwrap_or_default();
    let (uid, username) = match user_part.parse::<i64>() {
        Ok(uid) => (Some(api::Int64Value { value: uid }), String::new()),
        Err(_) => (None, user_part.to_string()),
    };
    api::Image {
        id: image.id.clone(),
        repo_tags,
        repo_digests,
        size: image.size,
        uid,
        username,
        spec: Some(api::ImageSpec {
            image: image.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// Registry credentials from CRI's AuthConfig: a user and password, or
/// `auth` (base64 of `user:password`, as in Docker's config).
fn credentials(auth: &api::AuthConfig) -> Result<Option<Credentials>, Status> {
    if !auth.identity_token.is_empty() || !auth.registry_token.is_empty() {
        return Err(Status::invalid_argument(
            "auth: identity and registry tokens are not supported by vmrun (give a username and password)",
        ));
    }
    if !auth.username.is_empty() {
        return Ok(Some(Credentials {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if auth.auth.is_empty() {
        return Ok(None);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.auth.trim())
        .map_err(|_| Status::invalid_argument("auth.auth: not base64"))?;
    let text =
        String::from_utf8(decoded).map_err(|_| Status::invalid_argument("auth.auth: not UTF-8"))?;
    let (username, password) = text
        .split_once(':')
        .ok_or_else(|| Status::invalid_argument("auth.auth: not \"user:password\""))?;
    Ok(Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    }))
}

fn pull_status(e: PullError) -> Status {
    let message = e.to_string();
    match e {
        PullError::Reference(_) => Status::invalid_argument(message),
        _ if message.contains("not found") || message.contains("MANIFEST_UNKNOWN") => {
            Status::not_found(message)
        }
        _ if message.contains("unauthorized") || message.contains("401") => {
            Status::permission_denied(message)
        }
        _ => Status::unknown(message),
    }
}

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn list_images(
        &self,
        request: Request<api::ListImagesRequest>,
    ) -> Reply<api::ListImagesResponse> {
        let wanted = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match wanted {
            Some(name) => self
                .store
                .get(&name)
                .map_err(store_error)?
                .into_iter()
                .collect(),
            None => self.store.list().map_err(store_error)?,
        };
        Ok(Response::new(api::ListImagesResponse {
            images: images.iter().map(cri_image).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<api::ImageStatusRequest>,
    ) -> Reply<api::ImageStatusResponse> {
        let r = request.into_inner();
        let name = image_name(r.image.as_ref())?;
        // An image that is not there is no error: the kubelet pulls it then.
        let image = self.store.get(&name).map_err(store_error)?;
        let mut info = HashMap::new();
        if r.verbose {
            if let Some(img) = &image {
                let detail = serde_json::json!({
                    "config": img.config,
                    "layers": img.layers,
                    "manifestDigest": img.manifest_digest,
                });
                info.insert("info".to_string(), detail.to_string());
            }
        }
        Ok(Response::new(api::ImageStatusResponse {
            image: image.as_ref().map(cri_image),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<api::PullImageRequest>,
    ) -> Reply<api::PullImageResponse> {
        let r = request.into_inner();
        let name = image_name(r.image.as_ref())?;
        let store = match r.auth.as_ref().map(credentials).transpose()?.flatten() {
            Some(creds) => self
                .store
                .with_credentials(&name, creds)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            None => self.store.clone(),
        };
        tracing::info!("pulling {name}");
        // The pull's future is not provably Send (a higher-ranked closure in
        // the image crate), so it runs on a blocking thread of its own.
        let handle = tokio::runtime::Handle::current();
        let image =
            tokio::task::spawn_blocking(move || handle.block_on(store.pull(&name, &NoProgress)))
                .await
                .map_err(|e| Status::internal(format!("pull: {e}")))?
                .map_err(pull_status)?;
        Ok(Response::new(api::PullImageResponse {
            image_ref: image.id,
        }))
    }

    async fn remove_image(
        &self,
        request: Request<api::RemoveImageRequest>,
    ) -> Reply<api::RemoveImageResponse> {
        let name = image_name(request.get_ref().image.as_ref())?;
        // CRI removes the image, not one name of it: every tag and digest
        // goes (as with containerd). Removing one that is not there succeeds.
        if let Some(image) = self.store.get(&name).map_err(store_error)? {
            match self.store.remove(&image.id) {
                // A removal running at the same time took it first.
                Ok(()) | Err(vmrun_image::StoreError::NotFound { .. }) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        Ok(Response::new(api::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<api::ImageFsInfoRequest>,
    ) -> Reply<api::ImageFsInfoResponse> {
        let root = self.store.root().to_path_buf();
        let usage = tokio::task::spawn_blocking(move || {
            crate::owner::filesystem_usage(&root, vmrun_container::dir_usage(&root))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(api::ImageFsInfoResponse {
            image_filesystems: vec![usage],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_comes_as_user_and_password_or_base64() {
        let plain = api::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(credentials(&plain).unwrap().unwrap().password, "p");
        let encoded = api::AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("alice:s3cret"),
            ..Default::default()
        };
        let c = credentials(&encoded).unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert!(credentials(&api::AuthConfig::default()).unwrap().is_none());
        let token = api::AuthConfig {
            identity_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(
            credentials(&token).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
