//! `vmrun image …`: list, pull, push, remove, inspect and import images in the local store,
//! and wrap a `.wasm` file as a Wasm OCI artifact (`build-wasm`).

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};
use vmrun_image::{Image, ImageStore, PullProgress};

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// List images (one row per reference; untagged images show as <none>)
    Ls,
    /// Pull an image from its registry (`busybox`, `registry:5000/ns/app:tag`, `name@sha256:…`)
    Pull { reference: String },
    /// Remove a reference, or an image and all its references by id; frees unused layers
    Rm { reference: String },
    /// Print an image (by reference or id prefix) as JSON
    Inspect { reference: String },
    /// Import an OCI image layout directory, an oci-archive or a `docker save` tar
    Import { file: PathBuf },
    /// Store a WebAssembly module (WASI p1) or component (p2) as a Wasm OCI artifact:
    /// config `application/vnd.wasm.config.v0+json`, one `application/wasm` layer, run as
    /// `/module.wasm`
    BuildWasm {
        /// The `.wasm` file
        file: PathBuf,
        /// Reference to store it under (`registry:5000/ns/app:tag`)
        #[arg(short = 't', long = "tag")]
        tag: String,
    },
    /// Push an image from the store to its registry (or to `--to`'s), blobs and manifest as
    /// stored
    Push {
        reference: String,
        /// Push under this reference instead (required when REFERENCE is an image id)
        #[arg(long)]
        to: Option<String>,
    },
}

pub async fn run(cmd: ImageCommand, store: &ImageStore) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Ls => {
            print!("{}", format_table(&store.list()?));
        }
        ImageCommand::Pull { reference } => {
            let progress = TerminalProgress::new();
            let image = store.pull(&reference, &progress).await?;
            progress.clear();
            println!("{} {}", image.references.join(", "), image.id);
        }
        ImageCommand::Rm { reference } => {
            store.remove(&reference)?;
            println!("removed {reference}");
        }
        ImageCommand::Inspect { reference } => {
            let image = store
                .get(&reference)?
                .with_context(|| format!("image {reference} not found"))?;
            println!("{}", serde_json::to_string_pretty(&image)?);
        }
        ImageCommand::Import { file } => {
            // Import is synchronous file work; keep it off the async runtime's threads.
            let progress = Arc::new(TerminalProgress::new());
            let (store, task_progress) = (store.clone(), progress.clone());
            let images =
                tokio::task::spawn_blocking(move || store.import(&file, task_progress.as_ref()))
                    .await
                    .context("import task failed")??;
            progress.clear();
            for image in images {
                let refs = if image.references.is_empty() {
                    "<none>".to_string()
                } else {
                    image.references.join(", ")
                };
                println!("imported {refs} {}", image.id);
            }
        }
        ImageCommand::BuildWasm { file, tag } => {
            let store = store.clone();
            let image = tokio::task::spawn_blocking(move || store.build_wasm(&file, &tag))
                .await
                .context("build-wasm task failed")??;
            println!(
                "{} {} ({}/{}, entrypoint {})",
                image.references.join(", "),
                image.id,
                image.config.os,
                image.config.architecture,
                image.config.entrypoint.join(" ")
            );
        }
        ImageCommand::Push { reference, to } => {
            let progress = TerminalProgress::new();
            let pushed = store.push(&reference, to.as_deref(), &progress).await?;
            progress.clear();
            println!("pushed {pushed}");
        }
    }
    Ok(())
}

/// `sha256:0123456789ab…` → `0123456789ab` (Docker's short image id).
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

fn format_table(images: &[Image]) -> String {
    let mut rows = vec![(
        "REFERENCE".to_string(),
        "IMAGE ID".to_string(),
        "SIZE".to_string(),
    )];
    for image in images {
        let size = HumanBytes(image.size).to_string();
        let refs = if image.references.is_empty() {
            vec!["<none>".to_string()]
        } else {
            image.references.clone()
        };
        for r in refs {
            rows.push((r, short_id(&image.id).to_string(), size.clone()));
        }
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(r, id, size)| format!("{r:<width$}  {id:<12}  {size}\n"))
        .collect()
}

/// Pull progress on stderr: one indicatif bar per layer when stderr is a terminal, otherwise
/// one plain line per finished layer (logs and CI output stay readable).
pub struct TerminalProgress {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
    /// Bytes per blob, for the plain-text summary lines.
    bytes: Mutex<HashMap<String, u64>>,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalProgress {
    pub fn new() -> Self {
        TerminalProgress {
            multi: std::io::stderr().is_terminal().then(MultiProgress::new),
            bars: Mutex::new(HashMap::new()),
            bytes: Mutex::new(HashMap::new()),
        }
    }

    /// Removes finished bars so the command's own output starts on a clean line.
    pub fn clear(&self) {
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }

    fn short(digest: &str) -> String {
        format!("{:<12}", short_id(digest))
    }
}

impl PullProgress for TerminalProgress {
    fn started(&self, digest: &str, size: Option<u64>) {
        let Some(multi) = &self.multi else {
            return;
        };
        let bar = match size {
            Some(len) => {
                let bar = ProgressBar::new(len);
                if let Ok(style) = ProgressStyle::with_template(
                    "{prefix} [{bar:30.cyan/blue}] {bytes:>10}/{total_bytes:<10} {msg}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                if let Ok(style) = ProgressStyle::with_template("{prefix} {spinner} {bytes} {msg}")
                {
                    bar.set_style(style);
                }
                bar
            }
        };
        bar.set_prefix(Self::short(digest));
        let bar = multi.add(bar);
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(digest.to_string(), bar);
        }
    }

    fn advanced(&self, digest: &str, bytes: u64) {
        if self.multi.is_some() {
            if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(digest).cloned()) {
                bar.inc(bytes);
            }
        } else if let Ok(mut totals) = self.bytes.lock() {
            *totals.entry(digest.to_string()).or_default() += bytes;
        }
    }

    fn finished(&self, digest: &str) {
        if self.multi.is_some() {
            if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(digest).cloned()) {
                bar.finish_with_message("done");
            }
        } else {
            let total = self
                .bytes
                .lock()
                .ok()
                .and_then(|t| t.get(digest).copied())
                .unwrap_or(0);
            eprintln!(
                "{}: done ({})",
                Self::short(digest).trim_end(),
                HumanBytes(total)
            );
        }
    }

    fn message(&self, msg: &str) {
        match &self.multi {
            // Printed above the bars so they are not torn.
            Some(multi) => {
                let _ = multi.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_reference() {
        let image = |id: &str, refs: &[&str], size| Image {
            id: id.to_string(),
            references: refs.iter().map(|r| r.to_string()).collect(),
            manifest_digest: String::new(),
            config: Default::default(),
            layers: vec![],
            size,
        };
        let table = format_table(&[
            image(
                "sha256:0123456789abcdef",
                &["docker.io/library/busybox:latest", "x/y:1"],
                2048,
            ),
            image("sha256:fedcba9876543210", &[], 1),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("REFERENCE"));
        assert!(
            lines[1].contains("docker.io/library/busybox:latest")
                && lines[1].contains("0123456789ab")
        );
        assert!(lines[1].contains("2.00 KiB"));
        assert!(lines[3].starts_with("<none>") && lines[3].contains("fedcba987654"));
    }
}
