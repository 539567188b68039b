//! Shared pieces of the benchmarks: timing commands to their first output line
//! and summarising samples.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Runs `cmd`, returning the time from spawn to its first stdout line; waits for it to exit.
pub fn time_to_first_line(cmd: &mut Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    let n = out.read_line(&mut line)?;
    let elapsed = start.elapsed();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    let output = child.wait_with_output()?;
    if n == 0 || !output.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            output.status,
            line,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(elapsed)
}

/// p50, p99 and mean of a set of samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
    let total: Duration = sorted.iter().sum();
    Summary {
        p50: at(0.5),
        p99: at(0.99),
        mean: total / sorted.len().max(1) as u32,
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Imports the test busybox image into the image store at `root` as
/// `localhost/busybox:latest` (no registry needed).
pub fn import_busybox(
    vmrun: &std::path::Path,
    root: &std::path::Path,
    work: &std::path::Path,
) -> anyhow::Result<()> {
    use vmrun_tests::images::{busybox_image, Compression};
    import_image(
        vmrun,
        root,
        work,
        &busybox_image(Compression::Gzip)?,
        "localhost/busybox:latest",
    )
}

/// Imports `image` into the image store at `root` as `name`, through an
/// OCI archive in `work` and `vmrun image import`.
pub fn import_image(
    vmrun: &std::path::Path,
    root: &std::path::Path,
    work: &std::path::Path,
    image: &vmrun_tests::images::TestImage,
    name: &str,
) -> anyhow::Result<()> {
    let archive = work.join("import.oci.tar");
    vmrun_tests::images::write_oci_archive(&archive, image, Some(name))?;
    let status = Command::new(vmrun)
        .arg("--root")
        .arg(root)
        .args(["image", "import"])
        .arg(&archive)
        .status()?;
    if !status.success() {
        bail!("vmrun image import of {name} failed");
    }
    Ok(())
}
