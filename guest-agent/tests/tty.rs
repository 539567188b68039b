//! Processes with `process.terminal = true` against the in-process agent:
//! they get a pty as stdio and controlling terminal; ResizeTty changes
//! what `stty size` reports.

mod common;

use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use vmrun_proto::v1::*;
use vmrun_proto::AgentClient;

fn resize(id: &str, exec_id: &str, rows: u32, cols: u32) -> ResizeTtyRequest {
    ResizeTtyRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        rows,
        cols,
    }
}

async fn output(
    client: &mut AgentClient<Channel>,
    id: &str,
    exec_id: &str,
) -> Streaming<OutputChunk> {
    client
        .read_output(ReadOutputRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Appends chunks to `seen` until it ends with `marker` (or the stream
/// ends: `None` marker). A terminal has no stderr.
async fn read_until(stream: &mut Streaming<OutputChunk>, seen: &mut String, marker: Option<&str>) {
    loop {
        if marker.is_some_and(|m| seen.ends_with(m)) {
            return;
        }
        let Some(chunk) = stream.next().await else {
            assert!(marker.is_none(), "output ended before {marker:?}: {seen:?}");
            return;
        };
        let chunk = chunk.unwrap();
        assert_eq!(chunk.stream(), output_chunk::Stream::Stdout);
        seen.push_str(&String::from_utf8(chunk.data).unwrap());
    }
}

#[tokio::test]
async fn terminal_processes_get_a_resizable_controlling_tty() {
    common::require_root("terminal_processes_get_a_resizable_controlling_tty");
    let agent = common::start_agent("tty");
    let _cleanup = common::kill_on_panic(&agent);
    let image = agent.tmp.path().join("image");
    common::busybox_rootfs(&image);
    let mut client = common::unix_client(&agent.socket).await;
    let sandbox = common::create_sandbox(&mut client, "tty-pod").await;
    let (ns, hosts) = (&sandbox.namespace_dir, &sandbox.etc_files["hosts"]);

    // A container init with a terminal, resized while it waits for start:
    // its first look already sees the size. /dev/tty only opens for a
    // process that has a controlling terminal.
    let script = "[ -t 0 ] && [ -t 1 ] && echo tty; stty size; echo ctty >/dev/tty";
    let mut spec = common::spec(&["sh", "-c", script], ns, hosts);
    spec["process"]["terminal"] = json!(true);
    client
        .create_container(common::create_req("init", &spec, &image, false))
        .await
        .unwrap();
    client.resize_tty(resize("init", "", 24, 80)).await.unwrap();
    let mut stream = output(&mut client, "init", "").await;
    client
        .start_container(StartContainerRequest {
            container_id: "init".into(),
        })
        .await
        .unwrap();
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, None).await;
    assert_eq!(seen, "tty\r\n24 80\r\nctty\r\n");
    assert_eq!(
        common::wait_process(&mut client, "init", "")
            .await
            .exit_code,
        0
    );

    // An exec'd process with a terminal, resized while it runs; stdin goes
    // through the terminal (echoed), and closing it is ^D.
    // The container has a devpts of its own, as a pod's containers do: the
    // exec's terminal comes from it, so it has a name in the container.
    let mut sleeper = common::spec(&["sleep", "1000"], ns, hosts);
    sleeper["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/dev/pts", "type": "devpts", "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    }));
    common::run_container(&mut client, "sleeper", &sleeper, &image).await;
    let script = "[ -t 0 ] && echo tty; tty; echo ready; read line; echo got $line; stty size; \
                  cat; echo cat-done";
    let mut process = common::process(&["sh", "-c", script]);
    process["terminal"] = json!(true);
    client
        .exec_process(ExecProcessRequest {
            container_id: "sleeper".into(),
            exec_id: "shell".into(),
            process_json: serde_json::to_vec(&process).unwrap(),
            stdin: true,
        })
        .await
        .unwrap();
    let mut stream = output(&mut client, "sleeper", "shell").await;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, Some("ready\r\n")).await;
    assert_eq!(seen, "tty\r\n/dev/pts/0\r\nready\r\n");
    client
        .resize_tty(resize("sleeper", "shell", 33, 111))
        .await
        .unwrap();
    let write = |data: &[u8], close| WriteStdinRequest {
        container_id: "sleeper".into(),
        exec_id: "shell".into(),
        data: data.to_vec(),
        close,
    };
    client.write_stdin(write(b"hello\n", false)).await.unwrap();
    read_until(&mut stream, &mut seen, Some("33 111\r\n")).await;
    client.write_stdin(write(b"abc\n", true)).await.unwrap();
    read_until(&mut stream, &mut seen, None).await;
    // "abc" twice: the terminal's echo and cat's copy.
    assert_eq!(
        seen,
        "tty\r\n/dev/pts/0\r\nready\r\nhello\r\ngot hello\r\n33 111\r\nabc\r\nabc\r\ncat-done\r\n"
    );
    let exit = common::wait_process(&mut client, "sleeper", "shell").await;
    assert_eq!((exit.exit_code, exit.signal), (0, 0));
    let closed = client.write_stdin(write(b"x", false)).await.unwrap_err();
    assert_eq!(closed.code(), Code::FailedPrecondition, "{closed:?}");

    // Errors name what failed.
    let e = client
        .resize_tty(resize("sleeper", "", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("sleeper") && e.message().contains("terminal"),
        "{e:?}"
    );
    let e = client
        .resize_tty(resize("nope", "", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("nope"), "{e:?}");
    let e = client
        .resize_tty(resize("sleeper", "nope", 1, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .resize_tty(resize("sleeper", "shell", 70_000, 80))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    client.shutdown(ShutdownRequest {}).await.unwrap();
    agent.server.await.unwrap().unwrap();
    common::assert_no_cgroups(&agent.cgroup_parent);
}
