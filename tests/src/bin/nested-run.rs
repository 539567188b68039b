//! `nested-run -- CMD [ARGS...]`: runs a command inside the nested L1 guest
//! (QEMU TCG with emulated SVM, the host's `/` shared), where `/dev/kvm` is
//! hardware-style KVM. For hosts whose own `/dev/kvm` is `kvm_pvm`, on which
//! stock guest kernels cannot boot at speed: the quickstart runs its vm pod
//! this way there. The command's output is streamed; its exit code is ours.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => &args[..],
    };
    if argv.is_empty() {
        eprintln!("usage: nested-run -- CMD [ARGS...]");
        return ExitCode::from(2);
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let result = vmrun_tests::nested::Command::new(&argv[0])
        .args(&argv[1..])
        .inherit_env()
        .current_dir(cwd)
        .echo(true)
        .output();
    match result {
        Ok(out) => {
            let code = out.output.status.code().unwrap_or(1);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("nested-run: {e:#}");
            ExitCode::from(1)
        }
    }
}
