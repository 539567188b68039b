//! Writes vmrun's test images as files, for set-up scripts and benchmarks that
//! have no registry: `build-test-images --out DIR` writes `DIR/busybox.oci.tar`
//! (an oci-archive named `localhost/busybox:latest`, importable with `vmrun image import`).

use std::path::PathBuf;

use anyhow::Context;
use vmrun_tests::images::{busybox_image, write_oci_archive, Compression};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = match (args.next().as_deref(), args.next()) {
        (Some("--out"), Some(dir)) => PathBuf::from(dir),
        _ => anyhow::bail!("usage: build-test-images --out DIR"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let image = busybox_image(Compression::Gzip)
        .context("building the busybox image (is busybox-static installed?)")?;
    let path = out.join("busybox.oci.tar");
    write_oci_archive(&path, &image, Some("localhost/busybox:latest"))?;
    println!("{}", path.display());
    Ok(())
}
