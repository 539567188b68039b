//! The nested test environment: real Linux guests under our VMM on hosts whose `/dev/kvm` is
//! `kvm_pvm` (a software hypervisor that emulates guest kernel code far too slowly for stock
//! Linux to boot).
//!
//! Such a test boots a level-1 (L1) guest in QEMU TCG with an emulated AMD CPU that has SVM
//! and nested paging (`-cpu EPYC,+svm,+npt`). L1 runs Debian's cloud kernel with `kvm-amd`
//! loaded, which gives it a hardware-style `/dev/kvm`; its `/` is the host's `/` shared
//! read-write over virtiofs (fresh `/proc`, `/sys`, `/dev`, `/tmp` and `/run` are mounted on
//! top), so the workspace, the test binaries and the caches are all there. Our VMM then runs
//! inside L1 and boots its (L2) guest on nested KVM.
//!
//! A test opts in with one line:
//!
//! ```no_run
//! #[test]
//! fn boots_a_guest() {
//!     vmrun_tests::hardware_kvm_or_nested!("boots_a_guest");
//!     // Runs on hardware KVM: on the host if it has it, otherwise inside L1.
//! }
//! ```
//!
//! On a host with hardware KVM the macro does nothing. Otherwise it re-runs this very test
//! (`--exact`) inside L1 with `VMRUN_NESTED_INSIDE=1`, prints its output, fails the test if it
//! failed there, and returns so the body does not run on the host. It never skips: a missing
//! QEMU, virtiofsd or L1 kernel fails the test with what is missing.
//!
//! [`run`] and [`Command`] run any command inside L1 (benchmarks use them). L1 boots are
//! serialized across processes by a lock file: each one takes both host cores.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};

use crate::nested_l1;

const QEMU: &str = "qemu-system-x86_64";
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// Set inside L1 for the re-run test; the macro then lets the body run.
pub const INSIDE_ENV: &str = "VMRUN_NESTED_INSIDE";
/// Seconds one L1 run may take (boot, command and power-off), default [`DEFAULT_TIMEOUT`].
pub const TIMEOUT_ENV: &str = "VMRUN_NESTED_TIMEOUT";
/// Set to keep each run directory (serial log, command output) for debugging.
pub const KEEP_ENV: &str = "VMRUN_NESTED_KEEP";
/// QEMU's TCG threading for L1 (`multi` or `single`), default [`DEFAULT_TCG_THREAD`].
pub const TCG_THREAD_ENV: &str = "VMRUN_NESTED_TCG_THREAD";
pub const DEFAULT_TCG_THREAD: &str = "multi";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_MEMORY_MIB: u64 = 4096;
/// Two: long runs wedged a one-vCPU L1 more often (docs/vm-runtime.md).
pub const DEFAULT_CPUS: u8 = 2;
/// L1's vCPUs when set (else [`DEFAULT_CPUS`] or what the test asks for).
pub const CPUS_ENV: &str = "VMRUN_NESTED_L1_CPUS";
/// Run directories live here, not in /tmp: L1 mounts a fresh tmpfs over /tmp.
const RUN_DIR_PARENT: &str = "/var/tmp";
const VIRTIOFS_TAG: &str = "host";
/// An AMD CPU with SVM and nested paging, so L1's `kvm_amd` offers nested KVM. XSAVE is
/// off: QEMU TCG's nested SVM lets an L2 `XSETBV` through without a #VMEXIT, so L1's KVM
/// never learns L2's XCR0 (the L2 kernel sees CPUID 0xD sizes that do not match its XCR0,
/// dumps the leaves and disables XSAVE) and reloads a stale XCR0 on every VM entry.
const L1_CPU: &str = "EPYC,+svm,+npt,-xsave";
const SERIAL_TAIL_LINES: usize = 60;
const POLL: Duration = Duration::from_millis(50);
/// L1 touches a heartbeat file every 5 s once its command runs; silence this long (from
/// the last beat, or from the start when none came yet) means L1 is wedged.
const L1_SILENCE_LIMIT: Duration = Duration::from_secs(120);
/// Boots of L1 for one command when L1 itself dies (see [`Command::output`]).
const L1_ATTEMPTS: u32 = 2;

/// A progress line on the real stderr (not the test harness's captured one): the long steps
/// (kernel download, L1 boots) should be visible while a test waits for them.
pub fn progress(message: &str) {
    let _ = writeln!(std::io::stderr(), "vmrun-tests nested: {message}");
}

/// True if `/dev/kvm` is hardware virtualization (not `kvm_pvm`).
pub fn host_has_hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists()
}

/// True inside L1 (in a test re-run by [`hardware_kvm_or_nested!`](crate::hardware_kvm_or_nested)).
pub fn inside_l1() -> bool {
    std::env::var_os(INSIDE_ENV).is_some_and(|v| v == "1")
}

/// True if a test that needs hardware KVM has to run inside L1.
pub fn needs_nesting() -> bool {
    !inside_l1() && !host_has_hardware_kvm()
}

/// Environment every command run inside L1 by this process gets: the results of host-side
/// preparation (built binaries, kernel paths) so the run inside does not redo them.
static FORWARDED: Mutex<BTreeMap<String, OsString>> = Mutex::new(BTreeMap::new());

/// Passes `key=value` to every later command run inside L1 by this process.
pub fn forward_env(key: &str, value: impl AsRef<OsStr>) {
    FORWARDED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.to_owned(), value.as_ref().to_owned());
}

/// What a command run inside L1 produced.
#[derive(Debug)]
pub struct NestedOutput {
    /// The command's exit status (a signal shows as 128 + its number), stdout and stderr.
    pub output: Output,
    /// From starting QEMU to L1 starting the command (modules loaded, share mounted).
    pub l1_boot: Option<Duration>,
    /// From starting QEMU to QEMU exiting.
    pub total: Duration,
}

/// Runs `argv` inside L1 with exactly the environment `env`, in the current directory.
pub fn run<A, K, V>(argv: &[A], env: &[(K, V)]) -> anyhow::Result<NestedOutput>
where
    A: AsRef<OsStr>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let (program, args) = argv.split_first().context("empty argv")?;
    let mut command = Command::new(program);
    command.args(args).clear_env();
    for (key, value) in env {
        command.env(key, value);
    }
    command.output()
}

/// A command to run inside L1, in the style of [`std::process::Command`].
#[derive(Clone, Debug)]
pub struct Command {
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    memory_mib: u64,
    cpus: u8,
    echo: bool,
}

impl Command {
    /// `program` (an absolute path, or a name looked up in the command's `PATH`) with `PATH`
    /// and `HOME` from this process, run in this process's current directory.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let timeout = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        let env = ["PATH", "HOME"]
            .into_iter()
            .filter_map(|k| Some((OsString::from(k), std::env::var_os(k)?)))
            .collect();
        Command {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env,
            cwd: None,
            timeout,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: std::env::var(CPUS_ENV)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(DEFAULT_CPUS),
            echo: false,
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&mut self, args: I) -> &mut Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.env
            .insert(key.as_ref().to_owned(), value.as_ref().to_owned());
        self
    }

    /// No environment but what [`Command::env`] adds (and [`forward_env`] values).
    pub fn clear_env(&mut self) -> &mut Self {
        self.env.clear();
        self
    }

    /// This process's whole environment.
    pub fn inherit_env(&mut self) -> &mut Self {
        self.env.extend(std::env::vars_os());
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// The limit for the whole L1 run (default 15 minutes, or `$VMRUN_NESTED_TIMEOUT` s).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = timeout;
        self
    }

    /// L1's memory (default 4 GiB; QEMU only allocates what L1 touches).
    pub fn memory_mib(&mut self, mib: u64) -> &mut Self {
        self.memory_mib = mib;
        self
    }

    /// L1's vCPUs (default [`DEFAULT_CPUS`]).
    pub fn cpus(&mut self, cpus: u8) -> &mut Self {
        self.cpus = cpus;
        self
    }

    /// Prints the command's output lines while it runs (with `print!`/`eprint!`, so the test
    /// harness captures them like a test's own output).
    pub fn echo(&mut self, echo: bool) -> &mut Self {
        self.echo = echo;
        self
    }

    /// Boots L1, runs the command inside it to completion and powers L1 off.
    pub fn output(&self) -> anyhow::Result<NestedOutput> {
        ensure!(
            nix::unistd::Uid::effective().is_root(),
            "the nested test environment needs root (virtiofsd, mounts in L1)"
        );
        let qemu = find_in_path(QEMU).with_context(|| {
            format!("{QEMU} not found in PATH (apt-get install qemu-system-x86)")
        })?;
        ensure!(
            Path::new(VIRTIOFSD).is_file(),
            "{VIRTIOFSD} is missing (apt-get install qemu-system-common)"
        );
        let kernel = nested_l1::kernel().context("getting the L1 kernel")?;
        let initramfs = nested_l1::initramfs(&kernel).context("building the L1 initramfs")?;

        let lock_path = nested_l1::cache_root().join(".boot.lock");
        let _boot_lock = match nix::fcntl::Flock::lock(
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) {
            Ok(lock) => lock,
            Err(_) => {
                progress("waiting for another L1 to finish (one at a time)");
                nested_l1::lock_file(&lock_path)?
            }
        };

        // L1 itself is QEMU TCG emulating nested SVM, and its kernel has been
        // seen to oops under load inside `svm_vcpu_run`. When L1 dies without
        // reporting the command's exit (an Err here; a command that fails is
        // an Ok with its status), the run is the environment's failure, not
        // the command's: it is retried once in a fresh L1, and said so.
        let mut attempt = 1;
        loop {
            let run_dir = tempfile::Builder::new()
                .prefix("vmrun-nested-")
                .tempdir_in(RUN_DIR_PARENT)
                .with_context(|| format!("creating a run directory in {RUN_DIR_PARENT}"))?;
            let result = self.boot(&qemu, &kernel.vmlinuz, &initramfs, run_dir.path());
            if std::env::var_os(KEEP_ENV).is_some() {
                progress(&format!("kept {}", run_dir.keep().display()));
            }
            match result {
                Err(e) if attempt < L1_ATTEMPTS => {
                    progress(&format!(
                        "L1 failed before the command reported its exit ({e:#}); \
                         retrying in a fresh L1"
                    ));
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn boot(
        &self,
        qemu: &Path,
        vmlinuz: &Path,
        initramfs: &Path,
        dir: &Path,
    ) -> anyhow::Result<NestedOutput> {
        let cwd = match &self.cwd {
            Some(cwd) => cwd.clone(),
            None => std::env::current_dir().context("current directory")?,
        };
        let mut env = FORWARDED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (OsString::from(k), v.clone()))
            .collect::<BTreeMap<_, _>>();
        env.extend(self.env.clone());
        fs::write(
            dir.join("run.sh"),
            run_script(&cwd, &env, &self.program, &self.args),
        )?;
        let keep = [Path::new(&self.program), &cwd]
            .iter()
            .filter_map(|p| p.strip_prefix("/tmp").ok())
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.to_string_lossy().into_owned() + "\n")
            .collect::<String>();
        fs::write(dir.join("keep-tmp"), keep)?;

        let mut children = Children::default();
        let socket = dir.join("virtiofsd.sock");
        let mut virtiofsd = std::process::Command::new(VIRTIOFSD);
        virtiofsd
            .arg(format!("--socket-path={}", socket.display()))
            .args(["-o", "source=/", "-o", "sandbox=chroot", "-o", "cache=auto"])
            // Extended attributes too: building an image's EROFS disk in L1
            // reads the overlay whiteout and opaque-directory xattrs.
            .args(["-o", "xattr"])
            .stdin(Stdio::null())
            .stdout(log_file(dir, "virtiofsd.log")?)
            .stderr(log_file(dir, "virtiofsd.log")?);
        children.virtiofsd = Some(spawn_tied(&mut virtiofsd, "virtiofsd")?);
        let ready = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = children.virtiofsd.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!(
                    "virtiofsd exited ({status}) before creating its socket:\n{}",
                    tail(&dir.join("virtiofsd.log"), 20)
                );
            }
            ensure!(
                Instant::now() < ready,
                "virtiofsd did not create {} within 10 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        let memory = format!("{}M", self.memory_mib);
        let serial = dir.join("serial.log");
        let monitor = dir.join("monitor.sock");
        let mut qemu_cmd = std::process::Command::new(qemu);
        qemu_cmd
            .args(["-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-machine", "q35", "-accel", &tcg_accel()])
            .args(["-cpu", L1_CPU])
            .args(["-smp", &self.cpus.to_string(), "-m", &memory])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
                "-numa",
                "node,memdev=mem",
            ])
            .args([
                "-chardev",
                &format!("socket,id=vfs,path={}", socket.display()),
                "-device",
                &format!("vhost-user-fs-pci,chardev=vfs,tag={VIRTIOFS_TAG}"),
            ])
            .arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initramfs)
            .args([
                "-append",
                &format!(
                    "console=ttyS0 panic=-1 rdinit=/init vmrun.dir={}",
                    dir.display()
                ),
            ])
            .args(["-display", "none", "-nic", "none"])
            .args([
                "-monitor",
                &format!("unix:{},server=on,wait=off", monitor.display()),
            ])
            .args(["-serial", &format!("file:{}", serial.display())])
            .stdin(Stdio::null())
            .stdout(log_file(dir, "qemu.log")?)
            .stderr(log_file(dir, "qemu.log")?);
        let start = Instant::now();
        let started_at = SystemTime::now();
        children.qemu = Some(spawn_tied(&mut qemu_cmd, "QEMU")?);
        progress(&format!(
            "booting L1 (QEMU TCG, {} vCPUs, {memory}) for {}",
            self.cpus,
            self.program.to_string_lossy()
        ));

        let deadline = start + self.timeout;
        let mut stdout = Follow::new(dir.join("stdout"));
        let mut stderr = Follow::new(dir.join("stderr"));
        let mut l1_boot = None;
        let status = loop {
            if self.echo {
                stdout.echo(|line| print!("{line}"));
                stderr.echo(|line| eprint!("{line}"));
            }
            if l1_boot.is_none()
                && fs::read_to_string(&serial)
                    .unwrap_or_default()
                    .contains("vmrun-l1: command started")
            {
                let elapsed = start.elapsed();
                l1_boot = Some(elapsed);
                progress(&format!(
                    "L1 up in {:.1}s, command running",
                    elapsed.as_secs_f64()
                ));
            }
            let qemu = children.qemu.as_mut().expect("QEMU was started");
            if let Some(status) = qemu.try_wait()? {
                break status;
            }
            if let Some(silence) = silent_for(&dir.join("heartbeat"), started_at) {
                if silence >= L1_SILENCE_LIMIT {
                    // Where the vCPUs stand, for the report: a wedge so far
                    // was "HLT=1" with interrupts pending (see nested_l1).
                    let cpu = monitor_command(&monitor, "info registers")
                        .map(|regs| {
                            regs.lines()
                                .filter(|l| l.starts_with("CPU#") || l.starts_with("RIP="))
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                        .unwrap_or_else(|e| format!("monitor: {e:#}"));
                    drop(children);
                    bail!(
                        "L1 stopped responding: no heartbeat for {}s ({cpu}); \
                         last lines of its serial console:\n{}",
                        silence.as_secs(),
                        tail(&serial, SERIAL_TAIL_LINES)
                    );
                }
            }
            if Instant::now() >= deadline {
                drop(children);
                bail!(
                    "L1 timed out after {:?}; last lines of its serial console:\n{}",
                    self.timeout,
                    tail(&serial, SERIAL_TAIL_LINES)
                );
            }
            std::thread::sleep(POLL);
        };
        let total = start.elapsed();
        drop(children);
        if self.echo {
            stdout.echo(|line| print!("{line}"));
            stderr.echo(|line| eprint!("{line}"));
            stdout.flush(|rest| print!("{rest}"));
            stderr.flush(|rest| eprint!("{rest}"));
        }

        let code = match fs::read_to_string(dir.join("status")) {
            Ok(text) => text
                .trim()
                .parse::<i32>()
                .with_context(|| format!("L1 wrote a bad status {text:?}"))?,
            Err(_) => bail!(
                "L1 did not report the command's exit status (QEMU: {status}); \
                 last lines of its serial console:\n{}\n--- QEMU log:\n{}\n--- virtiofsd log:\n{}",
                tail(&serial, SERIAL_TAIL_LINES),
                tail(&dir.join("qemu.log"), 10),
                tail(&dir.join("virtiofsd.log"), 10)
            ),
        };
        if code != 0 {
            progress(&format!(
                "the command exited with {code} inside L1; last lines of L1's console:\n{}",
                tail(&serial, 15)
            ));
        }
        Ok(NestedOutput {
            output: Output {
                status: ExitStatus::from_raw((code & 0xff) << 8),
                stdout: fs::read(dir.join("stdout")).unwrap_or_default(),
                stderr: fs::read(dir.join("stderr")).unwrap_or_default(),
            },
            l1_boot,
            total,
        })
    }
}

/// The script L1 runs in the chroot: change directory, then exec the command with exactly
/// `env`.
fn run_script(
    cwd: &Path,
    env: &BTreeMap<OsString, OsString>,
    program: &OsStr,
    args: &[OsString],
) -> Vec<u8> {
    let mut script = b"cd ".to_vec();
    script.extend(shell_quote(cwd.as_os_str()));
    script.extend_from_slice(b" || exit 125\nexec /usr/bin/env -i");
    for (key, value) in env {
        let mut pair = key.clone();
        pair.push("=");
        pair.push(value);
        script.push(b' ');
        script.extend(shell_quote(&pair));
    }
    for word in std::iter::once(program).chain(args.iter().map(OsString::as_os_str)) {
        script.push(b' ');
        script.extend(shell_quote(word));
    }
    script.push(b'\n');
    script
}

fn shell_quote(word: &OsStr) -> Vec<u8> {
    let mut quoted = vec![b'\''];
    for &b in word.as_bytes() {
        if b == b'\'' {
            quoted.extend_from_slice(b"'\\''");
        } else {
            quoted.push(b);
        }
    }
    quoted.push(b'\'');
    quoted
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .with_context(|| format!("opening {name}"))
}

/// Spawns `cmd` so that it gets SIGKILL if the spawning thread dies.
fn spawn_tied(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {what}"))
}

/// QEMU and virtiofsd of one run: killed (if still running) and reaped on drop.
#[derive(Default)]
struct Children {
    qemu: Option<Child>,
    virtiofsd: Option<Child>,
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in [self.qemu.take(), self.virtiofsd.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
    }
}

fn stop(mut child: Child) {
    if let Ok(None) = child.try_wait() {
        // virtiofsd exits by itself once QEMU is gone; give it a moment before SIGKILL.
        let grace = Instant::now() + Duration::from_secs(1);
        while Instant::now() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Follows a file another process appends to, handing out whole lines.
struct Follow {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Follow {
    fn new(path: PathBuf) -> Self {
        Follow {
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    fn echo(&mut self, mut sink: impl FnMut(&str)) {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        let mut new = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut new).is_err() {
            return;
        }
        self.offset += new.len() as u64;
        self.partial.extend_from_slice(&new);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            let lines: Vec<u8> = self.partial.drain(..=end).collect();
            sink(&String::from_utf8_lossy(&lines));
        }
    }

    fn flush(&mut self, mut sink: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            sink(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
    }
}

/// Runs one HMP command on QEMU's monitor socket and returns its answer.
fn monitor_command(socket: &Path, command: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The banner ends with the first prompt; the command's answer with the next.
    let mut prompts = 0;
    let mut sent = false;
    while prompts < 2 {
        let n = stream.read(&mut buf).context("reading the monitor")?;
        ensure!(n > 0, "the monitor closed the connection");
        answer.extend_from_slice(&buf[..n]);
        prompts = String::from_utf8_lossy(&answer).matches("(qemu)").count();
        if prompts == 1 && !sent {
            stream.write_all(format!("{command}\n").as_bytes())?;
            sent = true;
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let reply = text
        .split("(qemu)")
        .nth(1)
        .unwrap_or_default()
        .replace(command, "");
    Ok(match reply.trim() {
        "" => "ok".to_owned(),
        other => other.to_owned(),
    })
}

/// How long ago L1 last touched `heartbeat` (or since `started`, before the first beat).
fn silent_for(heartbeat: &Path, started: SystemTime) -> Option<Duration> {
    let last = fs::metadata(heartbeat)
        .and_then(|m| m.modified())
        .map_or(started, |beat| beat.max(started));
    SystemTime::now().duration_since(last).ok()
}

/// `-accel` for L1: TCG, threaded as `$VMRUN_NESTED_TCG_THREAD` says.
fn tcg_accel() -> String {
    let thread = std::env::var(TCG_THREAD_ENV).unwrap_or_else(|_| DEFAULT_TCG_THREAD.into());
    format!("tcg,thread={thread}")
}

/// The last `lines` lines of a file (or a note that it is unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// For benchmark binaries on a host without hardware KVM: runs this executable again inside
/// L1 with `args`, this process's environment and `VMRUN_NESTED_INSIDE=1` (so the run inside
/// can tell, with [`inside_l1`], that it should do the work and print its results). The
/// output is echoed as it comes and returned whole.
///
/// ```no_run
/// use vmrun_tests::nested;
/// if nested::needs_nesting() {
///     let out = nested::rerun_self_inside_l1(&["--json"]).expect("running inside L1");
///     assert!(out.output.status.success());
///     // parse out.output.stdout ...
/// } else {
///     // measure here: hardware KVM, or inside L1
/// }
/// ```
pub fn rerun_self_inside_l1(args: &[&str]) -> anyhow::Result<NestedOutput> {
    let exe = std::env::current_exe().context("this executable's path")?;
    Command::new(exe)
        .args(args)
        .inherit_env()
        .env(INSIDE_ENV, "1")
        .echo(true)
        .output()
}

/// The libtest name of test `name` declared in module `module_path` (`module_path!()`,
/// whose first segment is the crate).
pub fn test_path(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, module)) => format!("{module}::{name}"),
        None => name.to_owned(),
    }
}

/// The host half of [`hardware_kvm_or_nested!`](crate::hardware_kvm_or_nested): runs the test
/// inside L1 and fails unless it ran there and passed.
#[doc(hidden)]
pub fn run_test_nested(module_path: &str, name: &str, l1_cpus: Option<u8>) {
    let path = test_path(module_path, name);
    progress(&format!(
        "{path}: /dev/kvm is not hardware KVM here: running the test nested, inside L1"
    ));
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut command = Command::new(exe);
    command
        .args(["--exact", &path, "--nocapture", "--test-threads=1"])
        .inherit_env()
        .env(INSIDE_ENV, "1")
        .echo(true);
    if let Some(cpus) = l1_cpus {
        command.cpus(cpus);
    }
    let result = command.output();
    let out = match result {
        Ok(out) => out,
        Err(e) => panic!("{path}: cannot run the test nested inside L1: {e:#}"),
    };
    let stdout = String::from_utf8_lossy(&out.output.stdout);
    assert!(
        out.output.status.success(),
        "{path}: failed inside L1 ({})",
        out.output.status
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{path}: the run inside L1 did not run exactly this test:\n{stdout}"
    );
    let line = format!(
        "{path}: ran nested inside L1 and passed (L1 boot {}, whole run {:.1}s)",
        out.l1_boot
            .map_or("unknown".to_owned(), |d| format!("{:.1}s", d.as_secs_f64())),
        out.total.as_secs_f64()
    );
    println!("{line}");
    progress(&line);
}

/// Runs several tests of this test binary inside one L1 boot, one after the
/// other (`--exact a b c --test-threads=1`): they share the L1 boot and the
/// per-process set-up (registry, test images), which under emulation cost more
/// than most test bodies. Fails unless every one of them ran and passed; the
/// output names any that failed.
pub fn run_tests_nested(module_path: &str, names: &[&str]) {
    let paths: Vec<String> = names.iter().map(|n| test_path(module_path, n)).collect();
    progress(&format!(
        "/dev/kvm is not hardware KVM here: running {} tests nested, inside one L1: {}",
        paths.len(),
        paths.join(", ")
    ));
    let exe = std::env::current_exe().expect("the test executable's path");
    let result = Command::new(&exe)
        .arg("--exact")
        .args(&paths)
        .args(["--nocapture", "--test-threads=1"])
        .inherit_env()
        .env(INSIDE_ENV, "1")
        .echo(true)
        .output();
    let out = match result {
        Ok(out) => out,
        Err(e) => panic!("cannot run {paths:?} nested inside L1: {e:#}"),
    };
    let stdout = String::from_utf8_lossy(&out.output.stdout);
    // libtest lists the failed tests, indented, after the last "failures:".
    let failed: Vec<&str> = stdout
        .rsplit_once("\nfailures:\n")
        .map(|(_, list)| list.lines().map_while(|l| l.strip_prefix("    ")).collect())
        .unwrap_or_default();
    assert!(
        out.output.status.success() && failed.is_empty(),
        "inside L1 ({}): failed: {}",
        out.output.status,
        failed.join(", ")
    );
    let want = format!("test result: ok. {} passed", paths.len());
    assert!(
        stdout.contains(&want),
        "the run inside L1 did not run exactly {paths:?}:\n{stdout}"
    );
    let line = format!(
        "{} tests ran nested inside L1 and passed (L1 boot {}, whole run {:.1}s)",
        paths.len(),
        out.l1_boot
            .map_or("unknown".to_owned(), |d| format!("{:.1}s", d.as_secs_f64())),
        out.total.as_secs_f64()
    );
    println!("{line}");
    progress(&line);
}

/// Says where a test body runs (on hardware KVM on the host, or inside L1).
#[doc(hidden)]
pub fn note_where_running(module_path: &str, name: &str) {
    let path = test_path(module_path, name);
    if inside_l1() {
        println!("{path}: running inside L1 (nested KVM)");
    } else {
        println!("{path}: running on the host's hardware KVM");
    }
}

/// First line of a test that needs hardware KVM: on a host without it (`kvm_pvm`), runs the
/// test inside the nested L1 guest instead and returns early. See [`crate::nested`].
///
/// ```no_run
/// #[test]
/// fn boots_a_guest() {
///     vmrun_tests::hardware_kvm_or_nested!("boots_a_guest");
///     // ... the test, on hardware KVM ...
/// }
/// ```
#[macro_export]
macro_rules! hardware_kvm_or_nested {
    ($name:expr) => {
        $crate::hardware_kvm_or_nested!(@run $name, None)
    };
    // An L1 with this many vCPUs when nested.
    ($name:expr, l1_cpus = $cpus:expr) => {
        $crate::hardware_kvm_or_nested!(@run $name, Some($cpus))
    };
    (@run $name:expr, $cpus:expr) => {
        if $crate::nested::needs_nesting() {
            $crate::nested::run_test_nested(module_path!(), $name, $cpus);
            return;
        }
        $crate::nested::note_where_running(module_path!(), $name);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_script_quotes_everything() {
        let env = BTreeMap::from([(OsString::from("A"), OsString::from("it's $HOME"))]);
        let script = run_script(
            Path::new("/work dir"),
            &env,
            OsStr::new("/bin/echo"),
            &[OsString::from("a b"), OsString::from("'")],
        );
        assert_eq!(
            String::from_utf8(script).unwrap(),
            "cd '/work dir' || exit 125\n\
             exec /usr/bin/env -i 'A=it'\\''s $HOME' '/bin/echo' 'a b' ''\\'''\n"
        );
    }

    #[test]
    fn test_paths_drop_the_crate() {
        assert_eq!(test_path("nested_boot", "boots"), "boots");
        assert_eq!(test_path("nested_boot::inner", "boots"), "inner::boots");
    }
}
