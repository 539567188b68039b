//! The streaming side of Exec, Attach and PortForward: what runs when a
//! client connects to a URL of the streaming server. For Exec and
//! PortForward it asks the pod's owner where the container or the pod's
//! network is, then enters it from here, as `vmrun exec` does from another
//! process; an Attach is carried to the owner, which holds the container's
//! stdin, terminal and output.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use vmrun_container::Stdio;
use vmrun_streaming::{AsyncReadWrite, AttachRequest, Backend, ExecRequest, Streams, TerminalSize};

use super::registry::Registry;
use crate::api;
use crate::owner::attach::proto as owner_proto;
use crate::owner::verbose_info;

/// How long output may still arrive after the exec'd process ended (a
/// background process it left may hold the pipe).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct StreamBackend {
    pub registry: Arc<Registry>,
}

/// The exec target of a running container, from its owner.
async fn exec_target(registry: &Registry, id: &str) -> Result<serde_json::Value, String> {
    let (id, pod) = registry
        .container(id)
        .map_err(|s| s.message().to_string())?;
    let mut owner = pod.owner().map_err(|s| s.message().to_string())?;
    let status = owner
        .container_status(api::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let info = verbose_info(&status.info);
    match &info["execTarget"] {
        serde_json::Value::Null => Err(format!("container {id} is not running")),
        target => Ok(target.clone()),
    }
}

/// How a pod's ports are reached, from its owner.
enum PodPorts {
    /// Connect in this network namespace (None: the host's).
    Netns(Option<PathBuf>),
    /// Through a pod VM's guest agent, at this hybrid vsock socket.
    Guest(PathBuf),
}

async fn pod_ports(registry: &Registry, id: &str) -> Result<PodPorts, String> {
    let pod = registry.pod(id).map_err(|s| s.message().to_string())?;
    let mut owner = pod.owner().map_err(|s| s.message().to_string())?;
    let status = owner
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: true,
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let info = verbose_info(&status.info);
    if let Some(uds) = info["guestForwarder"].as_str() {
        return Ok(PodPorts::Guest(PathBuf::from(uds)));
    }
    Ok(PodPorts::Netns(info["netns"].as_str().map(PathBuf::from)))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

async fn copy_out(from: OwnedFd, to: Option<Box<dyn AsyncWrite + Send + Unpin>>) {
    let Ok(mut reader) = tokio::net::unix::pipe::Receiver::from_owned_fd(from) else {
        return;
    };
    match to {
        Some(mut to) => {
            let _ = tokio::io::copy(&mut reader, &mut to).await;
            let _ = to.shutdown().await;
        }
        None => {
            let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
        }
    }
}

async fn copy_in(from: Box<dyn AsyncRead + Send + Unpin>, to: OwnedFd) {
    let Ok(mut writer) = tokio::net::unix::pipe::Sender::from_owned_fd(to) else {
        return;
    };
    let mut from = from;
    let _ = tokio::io::copy(&mut from, &mut writer).await;
    // Dropping the writer is the process's EOF on stdin.
}

/// Sets the terminal size of the pty whose master is `master`.
fn set_size(master: &OwnedFd, size: TerminalSize) {
    let ws = libc::winsize {
        ws_row: size.height,
        ws_col: size.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points at
    // a live local; `master` is an open pty master.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// A pseudo-terminal from the container's own devpts (its /dev/ptmx, reached
/// through /proc), so the slave is a /dev/pts/N inside the container and
/// `tty`/ttyname(3) work there, as with runc's console socket.
fn container_pty(target: &serde_json::Value) -> Result<nix::pty::OpenptyResult, String> {
    use std::os::fd::FromRawFd;
    let pid = target["pid"].as_i64().ok_or("exec target without a pid")?;
    let ptmx = format!("/proc/{pid}/root/dev/ptmx");
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&ptmx)
        .map_err(|e| format!("{ptmx}: {e}"))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from a live local; `master` is an
    // open pty master.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(format!(
            "unlocking {ptmx}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd
    // (the slave, opened without a path lookup) or -1.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(format!(
            "opening the slave of {ptmx}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(nix::pty::OpenptyResult {
        master: OwnedFd::from(master),
        // SAFETY: `slave` is the fresh fd TIOCGPTPEER returned, owned by nobody else.
        slave: unsafe { OwnedFd::from_raw_fd(slave) },
    })
}

/// Runs `cmd` in a native container with the client's streams: pipes, or a
/// pseudo-terminal with `tty` (stdout carries both outputs then).
async fn exec_native(
    mut target: serde_json::Value,
    req: ExecRequest,
    streams: Streams,
) -> Result<i32, String> {
    let Streams {
        stdin,
        stdout,
        stderr,
        resize,
    } = streams;
    let mut copies = Vec::new();
    let mut stdin_copy = None;
    let mut master_keep = None;
    let stdio = if req.tty {
        let pty = container_pty(&target)?;
        target["process"]["terminal"] = serde_json::Value::Bool(true);
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("pty: {e}"));
        let stdio = Stdio {
            stdin: Some(dup(&pty.slave)?),
            stdout: Some(dup(&pty.slave)?),
            stderr: Some(pty.slave),
        };
        let master = pty.master;
        // Blocking pty I/O on threads of its own: a pty master is not a pipe.
        let reader = std::fs::File::from(dup(&master)?);
        if let Some(mut out) = stdout {
            copies.push(tokio::spawn(async move {
                let mut reader = tokio::fs::File::from_std(reader);
                // EIO once the process and every holder of the slave are gone.
                let _ = tokio::io::copy(&mut reader, &mut out).await;
                let _ = out.shutdown().await;
            }));
        }
        if let Some(input) = stdin {
            let writer = tokio::fs::File::from_std(std::fs::File::from(dup(&master)?));
            stdin_copy = Some(tokio::spawn(async move {
                let (mut input, mut writer) = (input, writer);
                let _ = tokio::io::copy(&mut input, &mut writer).await;
            }));
        }
        if let Some(mut sizes) = resize {
            let sized = dup(&master)?;
            copies.push(tokio::spawn(async move {
                while let Some(size) = sizes.recv().await {
                    set_size(&sized, size);
                }
            }));
        }
        master_keep = Some(master);
        drop(stderr);
        stdio
    } else {
        let stdin_fd = match stdin {
            Some(input) => {
                let (r, w) = pipe()?;
                stdin_copy = Some(tokio::spawn(copy_in(input, w)));
                Some(r)
            }
            None => None,
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        copies.push(tokio::spawn(copy_out(out_r, stdout)));
        copies.push(tokio::spawn(copy_out(err_r, stderr)));
        Stdio {
            stdin: stdin_fd,
            stdout: Some(out_w),
            stderr: Some(err_w),
        }
    };
    let cmd = req.cmd.clone();
    let process =
        tokio::task::spawn_blocking(move || vmrun_pod::native::spawn_exec(&target, &cmd, stdio))
            .await
            .map_err(|e| format!("exec: {e}"))??;
    let status = tokio::task::spawn_blocking(move || process.wait())
        .await
        .map_err(|e| format!("exec: {e}"))?
        .map_err(|e| format!("waiting for {:?}: {e}", req.cmd))?;
    if let Some(copy) = stdin_copy {
        copy.abort();
    }
    drop(master_keep);
    for copy in copies {
        if tokio::time::timeout(OUTPUT_DRAIN, copy).await.is_err() {
            tracing::debug!("exec {:?}: output still open after the exit", req.cmd);
        }
    }
    Ok(status.code)
}

/// A spawned task aborted when dropped: an attach's feeders end with it,
/// also when the streaming server drops the attach unfinished.
struct Feeder(tokio::task::JoinHandle<()>);

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Attach: the client's streams connected to the container's main process
/// through the pod's owner, which holds its stdin, terminal and output
/// (`ContainerIo.Attach` on the owner's socket, proto/owner.proto): what the
/// client types and its resizes go there, the output comes back as written.
async fn attach_via_owner(
    registry: &Registry,
    req: AttachRequest,
    streams: Streams,
) -> Result<(), String> {
    use owner_proto::attach_input::Input;
    use owner_proto::attach_output::Output;
    let (id, pod) = registry
        .container(&req.container_id)
        .map_err(|s| s.message().to_string())?;
    let socket = pod.dir.join(crate::owner::SOCKET_FILE);
    let channel = crate::unix::connect(&socket)
        .await
        .map_err(|e| format!("attach to {id}: connecting to the pod owner: {e}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let input = |input| owner_proto::AttachInput { input: Some(input) };
    let open = owner_proto::AttachOpen {
        container_id: id.clone(),
        stdin: req.stdin,
        stdout: req.stdout,
        stderr: req.stderr,
        tty: req.tty,
    };
    // Queued before the call: the owner reads it before it answers.
    let _ = tx.send(input(Input::Open(open))).await;
    let mut output = owner_proto::container_io_client::ContainerIoClient::new(channel)
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let Streams {
        stdin,
        mut stdout,
        mut stderr,
        resize,
    } = streams;
    let mut feeders = Vec::new();
    if let Some(mut from) = stdin.filter(|_| req.stdin) {
        let tx = tx.clone();
        feeders.push(Feeder(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                let sent = match from.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => tx.send(input(Input::Stdin(chunk[..n].to_vec()))).await,
                };
                if sent.is_err() {
                    return;
                }
            }
            // The input stream stays open: its end means the client is gone.
            let _ = tx.send(input(Input::StdinEnd(true))).await;
        })));
    }
    if let Some(mut sizes) = resize {
        let tx = tx.clone();
        feeders.push(Feeder(tokio::spawn(async move {
            while let Some(size) = sizes.recv().await {
                let size = owner_proto::TerminalSize {
                    width: size.width.into(),
                    height: size.height.into(),
                };
                if tx.send(input(Input::Resize(size))).await.is_err() {
                    return;
                }
            }
        })));
    }
    let mut result = Ok(());
    loop {
        let out = match output.message().await {
            Ok(Some(m)) => m.output,
            Ok(None) => break,
            Err(status) => {
                result = Err(status.message().to_string());
                break;
            }
        };
        let (to, data) = match out {
            Some(Output::Stdout(data)) => (stdout.as_mut(), data),
            Some(Output::Stderr(data)) => (stderr.as_mut(), data),
            None => continue,
        };
        if let Some(to) = to {
            if to.write_all(&data).await.is_err() {
                break; // the client went away
            }
        }
    }
    for out in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        let _ = out.shutdown().await;
    }
    // Dropping the feeders and the last sender ends the owner's session.
    drop(feeders);
    drop(tx);
    result
}

impl Backend for StreamBackend {
    fn exec(&self, req: ExecRequest, streams: Streams) -> BoxFuture<'static, Result<i32, String>> {
        let registry = self.registry.clone();
        async move {
            let target = exec_target(&registry, &req.container_id).await?;
            match target["runtime"].as_str() {
                Some("native") => exec_native(target, req, streams).await,
                Some("vm") => super::streaming_vm::exec(target, req, streams).await,
                other => Err(format!(
                    "exec with streams in {} containers is not available through CRI yet",
                    other.unwrap_or("unknown")
                )),
            }
        }
        .boxed()
    }

    fn attach(
        &self,
        req: AttachRequest,
        streams: Streams,
    ) -> BoxFuture<'static, Result<(), String>> {
        let registry = self.registry.clone();
        async move { attach_via_owner(&registry, req, streams).await }.boxed()
    }

    fn port_forward(
        &self,
        pod_sandbox_id: String,
        port: u16,
        stream: Box<dyn AsyncReadWrite>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let registry = self.registry.clone();
        async move {
            let netns = match pod_ports(&registry, &pod_sandbox_id).await? {
                PodPorts::Netns(netns) => netns,
                PodPorts::Guest(uds) => {
                    let mut guest = vmrun_proto::connect_guest_tcp(&uds, port)
                        .await
                        .map_err(|e| format!("port {port} in the pod VM: {e}"))?;
                    let mut stream = stream;
                    return tokio::io::copy_bidirectional(&mut stream, &mut guest)
                        .await
                        .map(drop)
                        .map_err(|e| format!("port {port}: {e}"));
                }
            };
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let tcp = tokio::task::spawn_blocking(move || match netns {
                Some(ns) => vmrun_cni::netns::connect_tcp(&ns, addr, CONNECT_TIMEOUT)
                    .map_err(|e| e.to_string()),
                None => std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                    .map_err(|e| format!("connecting to {addr}: {e}")),
            })
            .await
            .map_err(|e| e.to_string())??;
            tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let mut stream = stream;
            tokio::io::copy_bidirectional(&mut stream, &mut tcp)
                .await
                .map(drop)
                .map_err(|e| format!("port {port}: {e}"))
        }
        .boxed()
    }
}
