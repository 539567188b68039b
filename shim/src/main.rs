//! `vmrun`: run Kubernetes pods standalone (`vmrun run pod.yaml`) on the native,
//! vm or wasm runtime, manage images, and serve CRI for kubelet (`vmrun serve`).

mod config;
mod image_cmd;
mod pod_cmds;
mod prepare;
mod run_cmd;
mod serve_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmrun",
    version,
    about = "One pod runtime, three isolation levels: native, vm, wasm"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "VMRUN_CONFIG")]
    config: Option<PathBuf>,
    /// Image store directory (overrides the config file).
    #[arg(long, global = true, env = "VMRUN_ROOT")]
    root: Option<PathBuf>,
    /// Pod state directory (overrides the config file).
    #[arg(long, global = true, env = "VMRUN_STATE")]
    state: Option<PathBuf>,
    /// More logging (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pod of a Kubernetes manifest (Pod, plus ConfigMaps and Secrets).
    Run(run_cmd::RunArgs),
    /// List pods.
    Ps,
    /// Print a container's logs.
    Logs(pod_cmds::LogsArgs),
    /// Run a command in a running container.
    Exec(pod_cmds::ExecArgs),
    /// Stop a pod started with `run -d`.
    Stop(pod_cmds::StopArgs),
    /// Remove a stopped pod's record and logs.
    Rm(pod_cmds::RmArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Serve the CRI v1 API (RuntimeService, ImageService) for kubelet and crictl.
    Serve(serve_cmd::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMRUN_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmrun: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let mut config = config::Config::load(cli.config.as_deref())?;
    if let Some(root) = cli.root {
        config.root = root;
    }
    if let Some(state) = cli.state {
        config.state = state;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run_cmd::run(&config, args).await,
            Command::Ps => pod_cmds::ps(&config).map(|_| 0),
            Command::Logs(args) => pod_cmds::logs(&config, args).await.map(|_| 0),
            Command::Exec(args) => pod_cmds::exec(&config, args),
            Command::Stop(args) => pod_cmds::stop(&config, args).map(|_| 0),
            Command::Rm(args) => pod_cmds::rm(&config, args).map(|_| 0),
            Command::Serve(args) => serve_cmd::serve(&config, args).await.map(|_| 0),
            Command::Image(cmd) => {
                let store = vmrun_image::ImageStore::open(&config.root, config.registries.clone())?;
                image_cmd::run(cmd, &store).await.map(|_| 0)
            }
        }
    })
}
