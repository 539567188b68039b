//! Interop with the real client-go (what crictl and kubectl use).

use super::*;

/// Runs a client-go program (built from the vendored client-go of
/// cri-tools, see `testdata/interop.go`) against the server, when
/// `STREAMING_GO_CLIENT` names it; skipped otherwise.
async fn go_client(mode: &str, url: &str) -> Option<String> {
    let bin = std::env::var_os("STREAMING_GO_CLIENT")?;
    let out = tokio::process::Command::new(bin)
        .args([mode, url])
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{mode}: {text}");
    Some(text)
}

#[tokio::test]
async fn client_go_interop() {
    let (srv, fake) = server().await;
    for mode in ["exec-spdy", "exec-ws"] {
        let url = srv.get_exec(exec(&["echo", "3"], true, false)).unwrap();
        let Some(out) = go_client(mode, &url).await else {
            return;
        };
        assert!(out.contains("stdout=120000:"), "{mode}: {out}");
        assert!(
            out.contains("err=command terminated with exit code 3"),
            "{mode}: {out}"
        );
    }
    for mode in ["exec-spdy-tty", "exec-ws-tty"] {
        fake.resizes.lock().unwrap().clear();
        let url = srv.get_exec(exec(&["resize", "2"], true, true)).unwrap();
        let out = go_client(mode, &url).await.unwrap();
        assert!(out.contains("err=<nil>"), "{mode}: {out}");
        assert_eq!(fake.resizes.lock().unwrap().len(), 2, "{mode}");
    }
    for mode in ["pf-spdy", "pf-ws"] {
        let req = PortForwardRequest {
            pod_sandbox_id: "pod1".into(),
            ports: vec![80, 1],
        };
        let url = srv.get_port_forward(req).unwrap();
        let out = go_client(mode, &url).await.unwrap();
        assert!(out.contains(r#"port 80: "80:ping""#), "{mode}: {out}");
        // What the backend said reaches client-go on the error stream.
        let refused = "error forwarding port 1 to pod pod1: connection refused";
        assert!(out.contains(refused), "{mode}: {out}");
    }
    srv.shutdown().await;
}
