//! The `vmrun-vmm` binary: exit status and messages for guest outcomes and
//! bad configurations. Guests run on the real /dev/kvm.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{guests, require_kvm, temp_file};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmrun-vmm"))
        .args(args)
        .output()
        .expect("run vmrun-vmm")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Boots the ELF guest `code` (a PVH note if `pvh`) with 64 MiB, the
/// console off and the `extra` options.
fn boot_quietly(code: &[u8], pvh: bool, extra: &[&str]) -> Output {
    let (_k, kernel) = temp_file(&support::elf_image(code, pvh));
    let mut args = vec![
        "--kernel",
        path_str(&kernel),
        "--console",
        "off",
        "--memory",
        "64",
    ];
    args.extend_from_slice(extra);
    vmm(&args)
}

#[test]
fn guest_output_goes_to_the_console_file_and_status_is_zero() {
    require_kvm();
    let (_k, kernel) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let output = vmm(&[
        "--kernel",
        path_str(&kernel),
        "--cmdline",
        "console=ttyS0",
        "--memory",
        "64",
        "--console",
        path_str(&console),
    ]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "PVH console=ttyS0\n"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn stdio_console_prints_to_stdout() {
    require_kvm();
    let (_k, kernel) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    let output = vmm(&[
        "--kernel",
        path_str(&kernel),
        "--cmdline",
        "hi",
        "--memory",
        "64",
    ]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "PVH hi\n");
}

#[test]
fn console_off_prints_nothing() {
    require_kvm();
    let output = boot_quietly(guests::PVH_HELLO, true, &[]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert!(output.stdout.is_empty());
}

#[test]
fn guest_debug_exit_status_becomes_the_exit_status() {
    require_kvm();
    // Without the test MMIO device the guest's read-back check fails: status 4.
    let output = boot_quietly(guests::LINUX64_MMIO, false, &[]);
    assert_eq!(output.status.code(), Some(4), "stderr: {}", stderr(&output));
    assert!(stderr(&output).contains("guest exited with status 4"));
}

#[test]
fn triple_fault_exits_non_zero_with_one_clear_line() {
    require_kvm();
    let output = boot_quietly(guests::TRIPLE_FAULT, true, &[]);
    assert_eq!(output.status.code(), Some(1));
    let message: Vec<String> = stderr(&output)
        .lines()
        .filter(|l| !l.contains("kvm_pvm"))
        .map(String::from)
        .collect();
    assert_eq!(
        message,
        ["vmrun-vmm: guest crashed: triple fault on vCPU 0"]
    );
}

#[test]
fn reset_request_exits_zero_with_smp() {
    require_kvm();
    let output = boot_quietly(guests::I8042_RESET, true, &["--vcpus", "2"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
}

#[test]
fn json_config_file_is_accepted() {
    require_kvm();
    let (_k, kernel) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let config = serde_json::json!({
        "kernel": kernel, "cmdline": "from json", "memory_mib": 64, "console": {"file": console}
    });
    let config_path = dir.path().join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let output = vmm(&["--config", path_str(&config_path)]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "PVH from json\n"
    );
}

#[test]
fn kvm_pvm_host_is_named_in_one_line() {
    require_kvm();
    let output = boot_quietly(guests::PVH_HELLO, true, &[]);
    let pvm_lines = stderr(&output)
        .lines()
        .filter(|l| l.contains("kvm_pvm"))
        .count();
    let expected = usize::from(Path::new("/sys/module/kvm_pvm").exists());
    assert_eq!(pvm_lines, expected, "stderr: {}", stderr(&output));
}

/// Bad configurations fail before any VM exists: status 2, one line.
fn assert_bad_config(args: &[&str], message: &str) {
    let output = vmm(args);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{args:?}: {}",
        stderr(&output)
    );
    let text = stderr(&output);
    assert!(text.contains(message), "{args:?}: {text}");
    assert_eq!(text.lines().count(), 1, "{args:?}: {text}");
}

#[test]
fn bad_configurations_are_refused() {
    let (_k, kernel) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    let kernel = path_str(&kernel);
    assert_bad_config(
        &["--kernel", "/nonexistent/vmlinux"],
        "kernel /nonexistent/vmlinux: No such file",
    );
    assert_bad_config(
        &["--kernel", kernel, "--vcpus", "0"],
        "vcpus must be between 1 and 32, not 0",
    );
    assert_bad_config(
        &["--kernel", kernel, "--vcpus", "33"],
        "vcpus must be between 1 and 32, not 33",
    );
    assert_bad_config(
        &["--kernel", kernel, "--memory", "8"],
        "memory must be between 32 and",
    );
    assert_bad_config(
        &["--kernel", kernel, "--initrd", "/nonexistent/initrd"],
        "initrd /nonexistent/initrd",
    );
    assert_bad_config(&["--kernel", "/"], "kernel / is not a regular file");
}

#[test]
fn missing_kernel_option_is_a_usage_error() {
    let output = vmm(&[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--kernel"));
}

#[test]
fn a_file_that_is_no_kernel_is_refused() {
    require_kvm();
    let (_k, kernel) = temp_file(b"this is not a kernel");
    let output = vmm(&["--kernel", path_str(&kernel), "--memory", "64"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("is neither an ELF vmlinux nor a bzImage"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_net_devices_are_refused() {
    let (_k, kernel) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    let kernel = path_str(&kernel);
    // On the command line, clap reports the parse error (status 2).
    for (net, message) in [
        ("vmtap0,mac=52:54:00:zz:00:01", "invalid MAC address"),
        ("vmtap0,mac=01:00:5e:00:00:01", "multicast"),
        ("fd=x", "invalid net fd"),
        ("vmtap0,queues=2", "unknown net option"),
    ] {
        let output = vmm(&["--kernel", kernel, "--net", net]);
        assert_eq!(output.status.code(), Some(2), "{net}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(message),
            "{net}: {}",
            stderr(&output)
        );
    }
    assert_bad_config(
        &["--kernel", kernel, "--net", "a/b"],
        "invalid tap device name \"a/b\"",
    );
    assert_bad_config(
        &["--kernel", kernel, "--net", "tap=t0,fd=3"],
        "has both tap \"t0\" and fd 3",
    );
    // In a JSON config.
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("vm.json");
    for (nets, message) in [
        (serde_json::json!([{}]), "needs a tap name or a tap fd"),
        (
            serde_json::json!([{"tap": "t0", "fd": 3}]),
            "has both tap \"t0\" and fd 3",
        ),
        (
            serde_json::json!([{"tap": "t0", "mac": "52:54:00:00:01"}]),
            "invalid MAC address",
        ),
        (
            serde_json::json!([{"tap": "t0"}, {"tap": "t0"}]),
            "two net devices have the same tap t0",
        ),
    ] {
        let config = serde_json::json!({ "kernel": kernel, "nets": nets });
        std::fs::write(&config_path, config.to_string()).unwrap();
        assert_bad_config(&["--config", path_str(&config_path)], message);
    }
}

#[test]
fn a_tap_that_cannot_be_opened_fails_with_its_name() {
    require_kvm();
    let (_k, kernel) = temp_file(&support::elf_image(guests::PVH_HELLO, true));
    // An open file that is no tap, inherited as fd 0.
    let output = Command::new(env!("CARGO_BIN_EXE_vmrun-vmm"))
        .args(["--kernel", path_str(&kernel), "--memory", "64"])
        .args(["--console", "off", "--net", "fd=0"])
        .stdin(std::fs::File::open("/dev/null").unwrap())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("file descriptor 0 is not an attached tap device"),
        "{}",
        stderr(&output)
    );
}
