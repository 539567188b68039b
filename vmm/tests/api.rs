//! The control socket against VMs on the scripted fake hypervisor: status,
//! pause and resume of real vCPU threads, stop, a shutdown whose grace
//! period runs out, bad requests, and the socket file's removal.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

use serde_json::Value;
use support::{guests, temp_file};
use vmrun_vmm::config::VmConfig;
use vmrun_vmm::hypervisor::fake::FakeHypervisor;
use vmrun_vmm::stop::GuestStop;
use vmrun_vmm::vm::{MicroVm, RunError};

struct Running {
    _dir: tempfile::TempDir,
    _kernel: tempfile::TempPath,
    socket: PathBuf,
    hypervisor: FakeHypervisor,
    stop: std::sync::Arc<vmrun_vmm::stop::StopSignal>,
    vm: JoinHandle<Result<GuestStop, RunError>>,
}

/// A VM whose vCPUs have nothing to run (they wait to be kicked), with a
/// control socket.
fn start(vcpus: u8) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (kernel_guard, kernel) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    let mut config = VmConfig::new(&kernel);
    config.memory_mib = 64;
    config.vcpus = vcpus;
    config.api = Some(socket.clone());
    let hypervisor = FakeHypervisor::new();
    let vm = MicroVm::build(&hypervisor, &config, Box::new(std::io::sink())).unwrap();
    assert!(socket.exists(), "bound at build time");
    Running {
        _dir: dir,
        _kernel: kernel_guard,
        socket,
        hypervisor,
        stop: vm.stop_signal(),
        vm: std::thread::spawn(move || vm.run()),
    }
}

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(running: &Running) -> Client {
        let stream = UnixStream::connect(&running.socket).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    fn ask(&mut self, request: &str) -> Value {
        self.stream
            .write_all(format!("{request}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

#[test]
fn status_pause_resume_and_stop() {
    let running = start(2);
    let mut client = Client::connect(&running);
    let status = client.ask(r#"{"action":"status"}"#);
    assert_eq!(status["ok"], true);
    assert_eq!(status["state"], "running");
    assert_eq!(status["vcpus"], 2);
    assert_eq!(status["memory_mib"], 64);
    assert!(status["uptime_ms"].is_u64());

    // Both vCPU threads inside the (fake) guest first: a thread that has not
    // entered it yet parks at the gate without needing a kick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let inside = |r: &Running| {
        let record = r.hypervisor.record();
        record.vcpus.values().filter(|v| v.waiting_for_kick).count()
    };
    while inside(&running) != 2 {
        assert!(std::time::Instant::now() < deadline, "the vCPUs never ran");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kicks_before: usize = running
        .hypervisor
        .record()
        .vcpus
        .values()
        .map(|v| v.kicks)
        .sum();
    assert_eq!(client.ask(r#"{"action":"pause"}"#)["ok"], true);
    // The reply came after every vCPU thread left the guest and parked.
    let kicks_after: usize = running
        .hypervisor
        .record()
        .vcpus
        .values()
        .map(|v| v.kicks)
        .sum();
    assert_eq!(kicks_after, kicks_before + 2, "both vCPUs were kicked out");
    assert_eq!(client.ask(r#"{"action":"status"}"#)["state"], "paused");
    assert_eq!(client.ask(r#"{"action":"resume"}"#)["ok"], true);
    assert_eq!(client.ask(r#"{"action":"status"}"#)["state"], "running");

    // Pause again, then stop while paused: the parked vCPUs are released.
    assert_eq!(client.ask(r#"{"action":"pause"}"#)["ok"], true);
    assert_eq!(client.ask(r#"{"action":"stop"}"#)["ok"], true);
    let stop = running.vm.join().unwrap().unwrap();
    assert_eq!(stop, GuestStop::HostStop);
    assert_eq!(stop.exit_code(), 0);
    assert!(!running.socket.exists(), "the socket file is removed");
}

#[test]
fn shutdown_stops_the_vm_when_the_grace_period_runs_out() {
    let running = start(1);
    let mut client = Client::connect(&running);
    let reply = client.ask(r#"{"action":"shutdown","graceful_timeout_ms":20}"#);
    assert_eq!(reply["ok"], true);
    assert_eq!(
        reply["outcome"], "forced",
        "the fake guest never powers off"
    );
    assert_eq!(running.vm.join().unwrap().unwrap(), GuestStop::HostStop);
}

#[test]
fn bad_requests_get_an_error_and_the_connection_goes_on() {
    let running = start(1);
    let mut client = Client::connect(&running);
    for bad in [
        r#"{"action":"reboot"}"#,
        r#"{"action":"stop","now":true}"#,
        "not json",
    ] {
        let reply = client.ask(bad);
        assert_eq!(reply["ok"], false, "{bad}");
        assert!(reply["error"].as_str().unwrap().contains("known action"));
    }
    assert_eq!(client.ask(r#"{"action":"status"}"#)["ok"], true);
    // A second client after the first leaves.
    drop(client);
    let mut client = Client::connect(&running);
    assert_eq!(client.ask(r#"{"action":"stop"}"#)["ok"], true);
    running.vm.join().unwrap().unwrap();
}

#[test]
fn a_guest_stop_ends_the_server_and_removes_the_socket() {
    let running = start(1);
    let mut client = Client::connect(&running);
    assert_eq!(client.ask(r#"{"action":"status"}"#)["ok"], true);
    // The guest powers off on its own.
    running.stop.request(GuestStop::PowerOff);
    assert_eq!(running.vm.join().unwrap().unwrap(), GuestStop::PowerOff);
    assert!(!running.socket.exists());
    let mut line = String::new();
    assert_eq!(
        client.reader.read_line(&mut line).unwrap(),
        0,
        "the server closed the connection"
    );
}
