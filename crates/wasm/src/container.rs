//! One container: its WASI context (args, env, stdio, preopens, network),
//! its `Store` with the memory limiter and the epoch callback, and the call
//! of its entry point until it returns, exits, traps or is signalled.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use vmrun_pod::wasm::protocol::StartRequest;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, InstancePre, Linker, Store, UpdateDeadline};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cache::{Compiled, ModuleCache};
use crate::limits::{thread_cpu_time, CpuBudget, MemoryLimiter};

/// Store data of a core module (WASI preview 1).
pub struct P1Data {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

/// Store data of a component (WASI preview 2).
pub struct P2Data {
    ctx: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
}

impl WasiView for P2Data {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// A module or component linked against WASI, ready to instantiate.
#[derive(Clone)]
enum Prepared {
    Module(InstancePre<P1Data>),
    Component(CommandPre<P2Data>),
}

/// The process's engine, linkers, disk cache and prepared instances.
pub struct Runner {
    engine: Engine,
    cache: ModuleCache,
    p1: Linker<P1Data>,
    p2: wasmtime::component::Linker<P2Data>,
    /// By host path, while the file is unchanged: restarts skip reading,
    /// hashing and linking.
    prepared: Mutex<HashMap<PathBuf, (u64, SystemTime, Prepared)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("linking WASI: {0}")]
    Link(String),
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

/// Exit code of a trapped container: the wasmtime CLI's, an abort's.
pub const TRAP_EXIT_CODE: i32 = 128 + libc::SIGABRT;

/// A container's stop request: the first terminating signal delivered.
#[derive(Default)]
pub struct Control {
    signal: AtomicI32,
    notify: tokio::sync::Notify,
}

impl Control {
    /// Signals whose default action is to be ignored do nothing: WASI
    /// programs cannot catch signals, so the rest end the container.
    pub fn deliver(&self, signal: i32) {
        if [libc::SIGCHLD, libc::SIGCONT, libc::SIGURG, libc::SIGWINCH].contains(&signal) {
            return;
        }
        let _ = self
            .signal
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn pending(&self) -> Option<i32> {
        Some(self.signal.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }
}

impl Runner {
    pub fn new(engine: Engine, cache: ModuleCache) -> Result<Runner, RunnerError> {
        let mut p1 = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |d: &mut P1Data| &mut d.wasi)
            .map_err(|e| RunnerError::Link(format!("{e:#}")))?;
        let mut p2 = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2)
            .map_err(|e| RunnerError::Link(format!("{e:#}")))?;
        Ok(Runner {
            engine,
            cache,
            p1,
            p2,
            prepared: Mutex::new(HashMap::new()),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The prepared instance of `path`: compiled (or loaded from the disk
    /// cache), checked to be a WASI command, and linked.
    fn prepare(&self, path: &Path) -> Result<Prepared, String> {
        let stamp = std::fs::metadata(path)
            .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut prepared = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((len, modified, p)) = prepared.get(path) {
            if (*len, *modified) == stamp {
                return Ok(p.clone());
            }
        }
        let (compiled, digest, source) = self
            .cache
            .load(&self.engine, path)
            .map_err(|e| e.to_string())?;
        tracing::info!("{}: {source:?} (sha256:{digest})", path.display());
        let p = match compiled {
            Compiled::Module(module) => {
                let has_start = matches!(
                    module.get_export("_start"),
                    Some(wasmtime::ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0
                );
                if !has_start {
                    return Err(format!(
                        "module {} exports no `_start` function: it is not a WASI command (a reactor or library module cannot run as a container)",
                        path.display()
                    ));
                }
                let pre = self.p1.instantiate_pre(&module).map_err(|e| {
                    format!(
                        "module {} imports what WASI preview 1 does not provide: {e:#}",
                        path.display()
                    )
                })?;
                Prepared::Module(pre)
            }
            Compiled::Component(component) => {
                let pre = self.p2.instantiate_pre(&component).map_err(|e| {
                    format!(
                        "component {} imports what WASI preview 2 does not provide: {e:#}",
                        path.display()
                    )
                })?;
                let command = CommandPre::new(pre).map_err(|e| {
                    format!(
                        "component {} is not a WASI command (it exports no wasi:cli/run): {e:#}",
                        path.display()
                    )
                })?;
                Prepared::Component(command)
            }
        };
        prepared.insert(path.to_path_buf(), (stamp.0, stamp.1, p.clone()));
        Ok(p)
    }

    /// Runs one container on the calling thread to its end. `started` is
    /// told once it is instantiated (Ok) or why it cannot run (Err); only
    /// then is there an outcome.
    pub fn run(
        &self,
        request: &StartRequest,
        stdout: File,
        stderr: File,
        control: Arc<Control>,
        started: impl FnOnce(Result<(), String>),
    ) -> Option<Outcome> {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                started(Err(format!("container runtime: {e}")));
                return None;
            }
        };
        let mut trap_log = stderr.try_clone().ok();
        let outcome = runtime.block_on(self.run_async(request, stdout, stderr, control, started));
        if let (Some((_, Some(message))), Some(log)) = (&outcome, trap_log.as_mut()) {
            // The reason lands in the container's log, as a crash's would.
            let _ = writeln!(log, "{message}");
        }
        outcome.map(|(o, _)| o)
    }

    async fn run_async(
        &self,
        request: &StartRequest,
        stdout: File,
        stderr: File,
        control: Arc<Control>,
        started: impl FnOnce(Result<(), String>),
    ) -> Option<(Outcome, Option<String>)> {
        let prepared = match self.prepare(&request.wasm) {
            Ok(p) => p,
            Err(e) => {
                started(Err(e));
                return None;
            }
        };
        let builder = match wasi_builder(request, stdout, stderr) {
            Ok(b) => b,
            Err(e) => {
                started(Err(e));
                return None;
            }
        };
        let limiter = MemoryLimiter::new(request.memory_limit);
        let oom = limiter.hit_flag();
        let mut budget = CpuBudget::new(request.cpu_limit_milli);
        let ticks = control.clone();
        let on_tick = move || {
            if ticks.pending().is_some() {
                return UpdateDeadline::Interrupt;
            }
            match budget.check(Instant::now(), thread_cpu_time()) {
                Some(pause) => UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(pause))),
                None => UpdateDeadline::Yield(1),
            }
        };
        let result = match prepared {
            Prepared::Module(pre) => {
                let mut b = builder;
                let mut store = Store::new(
                    &self.engine,
                    P1Data {
                        wasi: b.build_p1(),
                        limiter,
                    },
                );
                store.limiter(|d| &mut d.limiter);
                let mut on_tick = on_tick;
                store.epoch_deadline_callback(move |_| Ok(on_tick()));
                store.set_epoch_deadline(1);
                let instance = match pre.instantiate_async(&mut store).await {
                    Ok(i) => i,
                    Err(e) => {
                        started(Err(format!(
                            "instantiating {}: {e:#}",
                            request.wasm.display()
                        )));
                        return None;
                    }
                };
                let start = match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                    Ok(f) => f,
                    Err(e) => {
                        started(Err(format!("{}: {e:#}", request.wasm.display())));
                        return None;
                    }
                };
                started(Ok(()));
                tokio::select! {
                    r = start.call_async(&mut store, ()) => Ok(r.map(|()| 0)),
                    () = control.notify.notified() => Err(()),
                }
            }
            Prepared::Component(pre) => {
                let mut b = builder;
                let mut store = Store::new(
                    &self.engine,
                    P2Data {
                        ctx: b.build(),
                        table: ResourceTable::new(),
                        limiter,
                    },
                );
                store.limiter(|d| &mut d.limiter);
                let mut on_tick = on_tick;
                store.epoch_deadline_callback(move |_| Ok(on_tick()));
                store.set_epoch_deadline(1);
                let command = match pre.instantiate_async(&mut store).await {
                    Ok(c) => c,
                    Err(e) => {
                        started(Err(format!(
                            "instantiating {}: {e:#}",
                            request.wasm.display()
                        )));
                        return None;
                    }
                };
                started(Ok(()));
                tokio::select! {
                    r = command.wasi_cli_run().call_run(&mut store) => {
                        Ok(r.map(|status| if status.is_ok() { 0 } else { 1 }))
                    }
                    () = control.notify.notified() => Err(()),
                }
            }
        };
        Some(classify(
            result,
            control.pending(),
            oom.load(Ordering::SeqCst),
        ))
    }
}

/// The outcome of a call: returned (0), exited (its code), signalled
/// (128 + signal), over its memory (OOMKilled) or trapped (with the trap).
fn classify(
    result: Result<wasmtime::Result<i32>, ()>,
    signal: Option<i32>,
    oom: bool,
) -> (Outcome, Option<String>) {
    let ended = |code| Outcome {
        code,
        signal: None,
        oom_killed: false,
    };
    match result {
        Ok(Ok(code)) => (ended(code), None),
        Ok(Err(e)) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                return (ended(exit.0), None);
            }
            if oom {
                let outcome = Outcome {
                    code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    oom_killed: true,
                };
                return (outcome, Some(format!("wasm: {e:#}")));
            }
            if let Some(sig) = signal {
                return (killed(sig), None);
            }
            (ended(TRAP_EXIT_CODE), Some(format!("wasm trap: {e:?}")))
        }
        Err(()) => (killed(signal.unwrap_or(libc::SIGKILL)), None),
    }
}

fn killed(sig: i32) -> Outcome {
    Outcome {
        code: 128 + sig,
        signal: Some(sig),
        oom_killed: false,
    }
}

fn wasi_builder(
    request: &StartRequest,
    stdout: File,
    stderr: File,
) -> Result<WasiCtxBuilder, String> {
    let mut b = WasiCtxBuilder::new();
    b.args(&request.args)
        .envs(&request.env)
        .stdout(OutputFile::new(stdout))
        .stderr(OutputFile::new(stderr))
        // The engine lives in the pod's network namespace: the pod's
        // addresses are the component's.
        .inherit_network()
        .allow_tcp(true)
        .allow_udp(true)
        .allow_ip_name_lookup(true);
    if let Some(cwd) = &request.cwd {
        b.initial_cwd(cwd);
    }
    for p in &request.preopens {
        let perms = if p.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        b.preopened_dir(&p.host, &p.guest, perms)
            .map_err(|e| format!("preopening {} as {}: {e:#}", p.host.display(), p.guest))?;
    }
    Ok(b)
}
