//! `vmrun exec` into a vm-runtime container from another process: the exec
//! target names the VM's vsock socket and the container inside.

use std::io::Write;

use vmrun_proto::v1;

/// Runs `argv` in the container of a vm exec target, copying its output to
/// this process's stdout and stderr; returns its exit code. Blocks; runs
/// its own runtime on a thread of its own, so callers inside a tokio
/// runtime may call it too.
pub fn exec_to_terminal(target: &serde_json::Value, argv: &[String]) -> Result<i32, String> {
    let target = target.clone();
    let argv = argv.to_vec();
    std::thread::spawn(move || exec_on_this_thread(&target, &argv))
        .join()
        .map_err(|_| "the exec thread panicked".to_string())?
}

fn exec_on_this_thread(target: &serde_json::Value, argv: &[String]) -> Result<i32, String> {
    let vsock = target["vsock"]
        .as_str()
        .ok_or("exec target has no vsock socket")?;
    let container_id = target["container_id"]
        .as_str()
        .ok_or("exec target has no container id")?
        .to_string();
    let mut process = target["process"].clone();
    process["args"] = serde_json::json!(argv);
    // Unique per host process: exec ids only need to differ within a container.
    let exec_id = format!("cli-{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async {
        let mut agent = vmrun_proto::connect_hybrid_vsock(
            std::path::Path::new(vsock),
            vmrun_proto::AGENT_VSOCK_PORT,
        )
        .await
        .map_err(|e| format!("the pod VM: {e}"))?;
        let status =
            |what: &str, s: tonic::Status| format!("{what}: {} ({:?})", s.message(), s.code());
        agent
            .exec_process(v1::ExecProcessRequest {
                container_id: container_id.clone(),
                exec_id: exec_id.clone(),
                process_json: serde_json::to_vec(&process).map_err(|e| e.to_string())?,
                stdin: false,
            })
            .await
            .map_err(|s| status("exec", s))?;
        let mut stream = agent
            .read_output(v1::ReadOutputRequest {
                container_id: container_id.clone(),
                exec_id: exec_id.clone(),
            })
            .await
            .map_err(|s| status("output", s))?
            .into_inner();
        while let Some(chunk) = stream.message().await.map_err(|s| status("output", s))? {
            let _ = if chunk.stream == v1::output_chunk::Stream::Stderr as i32 {
                std::io::stderr().write_all(&chunk.data)
            } else {
                std::io::stdout().write_all(&chunk.data)
            };
        }
        let _ = std::io::stdout().flush();
        let done = agent
            .wait_process(v1::WaitProcessRequest {
                container_id,
                exec_id,
            })
            .await
            .map_err(|s| status("wait", s))?
            .into_inner();
        Ok(done.exit_code)
    })
}
