//! Test harness shared by the end-to-end tests: a local registry and test images.
//!
//! Most tests just need "some pullable busybox": [`shared_busybox`] starts one registry per
//! test process on first use and pushes busybox to it. That registry intentionally lives until
//! the process exits (it sits in a `static`, which Rust never drops); its watchdog (see
//! [`registry`]) notices the process going away and stops it and deletes its storage then.

pub mod cni;
pub mod cri;
pub mod fault_proxy;
pub mod images;
pub mod nested;
pub mod nested_cpio;
pub mod nested_l1;
pub mod nested_vmm;
pub mod pod;
pub mod registry;
pub mod wasm_programs;

pub use pod::busybox_reference;

use tokio::sync::OnceCell;

use crate::registry::Registry;

struct Shared {
    registry: Registry,
    busybox: String,
}

static SHARED: OnceCell<Shared> = OnceCell::const_new();
static ENTRYPOINT: OnceCell<String> = OnceCell::const_new();
static ZSTD: OnceCell<String> = OnceCell::const_new();
static PROCPS: OnceCell<String> = OnceCell::const_new();

async fn shared() -> anyhow::Result<&'static Shared> {
    SHARED
        .get_or_try_init(|| async {
            let registry = tokio::task::spawn_blocking(Registry::start).await??;
            let busybox = images::push_busybox(&registry, "test/busybox:latest").await?;
            Ok(Shared { registry, busybox })
        })
        .await
}

/// The process-wide test registry (started on first use).
pub async fn shared_registry() -> anyhow::Result<&'static Registry> {
    Ok(&shared().await?.registry)
}

/// `127.0.0.1:PORT/test/busybox:latest` in the process-wide registry.
pub async fn shared_busybox() -> anyhow::Result<String> {
    Ok(shared().await?.busybox.clone())
}

/// `127.0.0.1:PORT/test/entrypoint:latest`: busybox with `Entrypoint ["/bin/echo",
/// "entrypoint"]`, `Cmd ["cmd-default"]`, `WorkingDir /tmp` (see [`images::entrypoint_image`]).
pub async fn shared_entrypoint_image() -> anyhow::Result<String> {
    let registry = shared_registry().await?;
    ENTRYPOINT
        .get_or_try_init(|| images::push_image_with_entrypoint(registry, "test/entrypoint:latest"))
        .await
        .cloned()
}

/// `127.0.0.1:PORT/test/busybox-zstd:latest`: busybox with a zstd-compressed layer.
pub async fn shared_busybox_zstd() -> anyhow::Result<String> {
    let registry = shared_registry().await?;
    ZSTD.get_or_try_init(|| images::push_busybox_zstd(registry, "test/busybox-zstd:latest"))
        .await
        .cloned()
}

/// `127.0.0.1:PORT/test/procps:latest`: busybox plus procps's `free` (see
/// [`images::procps_image`]).
pub async fn shared_procps_image() -> anyhow::Result<String> {
    let registry = shared_registry().await?;
    PROCPS
        .get_or_try_init(|| async {
            let image = images::procps_image()?;
            images::push_image(&registry.addr(), "test/procps:latest", &image).await
        })
        .await
        .cloned()
}
