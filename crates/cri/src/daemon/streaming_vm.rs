//! Streaming Exec into a pod VM's container: the guest agent runs the
//! process (with a pseudo-terminal when asked) and the daemon carries the
//! client's streams over its hybrid vsock: ReadOutput to stdout/stderr,
//! WriteStdin from stdin, ResizeTty from resize events, WaitProcess for
//! the exit code.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmrun_proto::v1;
use vmrun_streaming::{ExecRequest, Streams};

/// Exec ids of this daemon (unique within a container is enough; the pid
/// keeps a restarted daemon's apart).
static EXEC_IDS: AtomicU64 = AtomicU64::new(0);

fn status(what: &str, s: tonic::Status) -> String {
    format!("{what} in the pod VM: {} ({:?})", s.message(), s.code())
}

pub(super) async fn exec(
    target: serde_json::Value,
    req: ExecRequest,
    streams: Streams,
) -> Result<i32, String> {
    let vsock = target["vsock"]
        .as_str()
        .ok_or("the container's exec target names no pod VM socket")?
        .to_string();
    let container_id = target["container_id"]
        .as_str()
        .ok_or("the container's exec target names no container")?
        .to_string();
    let exec_id = format!(
        "cri-{}-{}",
        std::process::id(),
        EXEC_IDS.fetch_add(1, Ordering::Relaxed)
    );
    let mut process = target["process"].clone();
    process["args"] = serde_json::json!(req.cmd);
    process["terminal"] = serde_json::Value::Bool(req.tty);
    let mut agent = vmrun_proto::connect_hybrid_vsock(
        std::path::Path::new(&vsock),
        vmrun_proto::AGENT_VSOCK_PORT,
    )
    .await
    .map_err(|e| format!("the pod VM: {e}"))?;
    let Streams {
        stdin,
        stdout,
        stderr,
        resize,
    } = streams;
    agent
        .exec_process(v1::ExecProcessRequest {
            container_id: container_id.clone(),
            exec_id: exec_id.clone(),
            process_json: serde_json::to_vec(&process).map_err(|e| e.to_string())?,
            stdin: stdin.is_some(),
        })
        .await
        .map_err(|s| status("exec", s))?;
    let ids = (container_id.clone(), exec_id.clone());

    // One task feeds both, resizes first: a size the client sent before
    // its input is in place when the process reads that input.
    let feeder = tokio::spawn(feed(agent.clone(), ids, stdin, resize));

    let mut output = agent
        .read_output(v1::ReadOutputRequest {
            container_id: container_id.clone(),
            exec_id: exec_id.clone(),
        })
        .await
        .map_err(|s| status("output", s))?
        .into_inner();
    let (mut stdout, mut stderr) = (stdout, stderr);
    while let Some(chunk) = output.message().await.map_err(|s| status("output", s))? {
        let to = if chunk.stream == v1::output_chunk::Stream::Stderr as i32 {
            stderr.as_mut()
        } else {
            stdout.as_mut()
        };
        if let Some(to) = to {
            // A client that went away stops reading; the process goes on.
            let _ = to.write_all(&chunk.data).await;
        }
    }
    for out in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        let _ = out.shutdown().await;
    }
    let done = agent
        .wait_process(v1::WaitProcessRequest {
            container_id,
            exec_id,
        })
        .await
        .map_err(|s| status("wait", s))?
        .into_inner();
    feeder.abort();
    Ok(done.exit_code)
}

/// Carries the client's stdin (closed at its end) and terminal sizes to
/// the process until both are done.
async fn feed(
    mut agent: vmrun_proto::AgentClient<tonic::transport::Channel>,
    ids: (String, String),
    mut stdin: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
    mut sizes: Option<tokio::sync::mpsc::Receiver<vmrun_streaming::TerminalSize>>,
) {
    let mut buf = vec![0u8; 32 << 10];
    while stdin.is_some() || sizes.is_some() {
        tokio::select! {
            biased;
            size = async { sizes.as_mut()?.recv().await }, if sizes.is_some() => match size {
                Some(size) => {
                    let request = v1::ResizeTtyRequest {
                        container_id: ids.0.clone(),
                        exec_id: ids.1.clone(),
                        rows: size.height.into(),
                        cols: size.width.into(),
                    };
                    let _ = agent.resize_tty(request).await;
                }
                None => sizes = None,
            },
            n = async { stdin.as_mut()?.read(&mut buf).await.ok() }, if stdin.is_some() => {
                let n = n.unwrap_or(0);
                let request = v1::WriteStdinRequest {
                    container_id: ids.0.clone(),
                    exec_id: ids.1.clone(),
                    data: buf[..n].to_vec(),
                    close: n == 0,
                };
                if agent.write_stdin(request).await.is_err() || n == 0 {
                    stdin = None;
                }
            }
        }
    }
}
