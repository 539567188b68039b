//! `wasm-box COMMAND ARGS...`: a multi-call test tool for the wasm runtime (WASI p1 and p2).
//!
//! Commands:
//!
//! - `echo ARGS...`: prints the arguments joined by spaces and a newline.
//! - `env`: prints every environment variable as `K=V`, one a line.
//! - `cat FILE...`: prints the files; a missing or unreadable one is reported on stderr, exit 1.
//! - `write FILE TEXT...`: creates or truncates FILE and writes TEXT (the arguments joined by
//!   spaces, no newline added); exit 1 with a message on stderr on error.
//! - `ls [DIR]`: prints DIR's entries (default `.`), sorted, one a line, directories with `/`.
//! - `exit N`: exits with code N. As a WASI p2 component only 0 and 1 survive: std exits
//!   through `wasi:cli/exit.exit(result)`, so any N other than 0 is reported as failure (1).
//! - `sleep SECS`: sleeps SECS seconds (fractions allowed), then exits 0.
//! - `hold MESSAGE SECS`: prints MESSAGE and a newline, then sleeps SECS seconds and exits 0.
//! - `spin`: a busy loop forever that makes no host calls.
//! - `alloc MIB`: allocates and touches MIB mebibytes, 1 MiB at a time, printing
//!   `allocated N MiB` after each, then sleeps forever.
//! - `clock`: prints `monotonic NS` (nanoseconds since the first reading, then after a short
//!   sleep), `wall SECS.NANOS` (since the Unix epoch) and `random HEX` (8 bytes from the host's
//!   random source through std's `RandomState`).
//! - `stderr TEXT...`: prints the arguments joined by spaces to stderr.
//! - `serve-once PORT [TEXT...]` (wasm32-wasip2 only; WASI p1 cannot open sockets): listens
//!   on 0.0.0.0:PORT, prints `listening on PORT`, answers one HTTP request with TEXT (default
//!   `hello from wasm-box\n`) and exits 0.
//!
//! An unknown command prints `wasm-box: unknown command X` to stderr and exits 2; a missing
//! command or bad argument prints usage to stderr and exits 2.

use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(command) = args.get(1) else {
        eprintln!("usage: wasm-box COMMAND ARGS... (echo, env, cat, write, ls, exit, sleep, hold, spin, alloc, clock, stderr, serve-once)");
        return ExitCode::from(2);
    };
    let rest = &args[2..];
    match command.as_str() {
        "echo" => {
            println!("{}", rest.join(" "));
            ExitCode::SUCCESS
        }
        "env" => {
            for (key, value) in std::env::vars_os() {
                println!("{}={}", key.to_string_lossy(), value.to_string_lossy());
            }
            ExitCode::SUCCESS
        }
        "cat" => cat(rest),
        "write" => write(rest),
        "ls" => ls(rest.first().map(String::as_str).unwrap_or(".")),
        "exit" => match rest.first().map(|n| n.parse::<i32>()) {
            Some(Ok(code)) => {
                let _ = io::stdout().flush();
                std::process::exit(code)
            }
            _ => usage("exit N"),
        },
        "sleep" => match rest.first().map(|s| s.parse::<f64>()) {
            Some(Ok(secs)) if secs >= 0.0 && secs.is_finite() => {
                std::thread::sleep(Duration::from_secs_f64(secs));
                ExitCode::SUCCESS
            }
            _ => usage("sleep SECS"),
        },
        // A line, then idle: a container that says it started and stays.
        "hold" => match rest.get(1).map(|s| s.parse::<f64>()) {
            Some(Ok(secs)) if secs >= 0.0 && secs.is_finite() => {
                println!("{}", rest[0]);
                let _ = io::stdout().flush();
                std::thread::sleep(Duration::from_secs_f64(secs));
                ExitCode::SUCCESS
            }
            _ => usage("hold MESSAGE SECS"),
        },
        "spin" => spin(),
        "alloc" => match rest.first().map(|n| n.parse::<usize>()) {
            Some(Ok(mib)) => alloc(mib),
            _ => usage("alloc MIB"),
        },
        "clock" => clock(),
        "stderr" => {
            eprintln!("{}", rest.join(" "));
            ExitCode::SUCCESS
        }
        "serve-once" => serve_once(rest),
        other => {
            eprintln!("wasm-box: unknown command {other}");
            ExitCode::from(2)
        }
    }
}

fn usage(synopsis: &str) -> ExitCode {
    eprintln!("usage: wasm-box {synopsis}");
    ExitCode::from(2)
}

fn cat(files: &[String]) -> ExitCode {
    let mut status = ExitCode::SUCCESS;
    let mut stdout = io::stdout().lock();
    for file in files {
        match std::fs::read(file) {
            Ok(bytes) => {
                if let Err(e) = stdout.write_all(&bytes) {
                    eprintln!("wasm-box: cat: writing stdout: {e}");
                    return ExitCode::FAILURE;
                }
            }
            Err(e) => {
                eprintln!("wasm-box: cat: {file}: {e}");
                status = ExitCode::FAILURE;
            }
        }
    }
    let _ = stdout.flush();
    status
}

fn write(args: &[String]) -> ExitCode {
    let Some((file, text)) = args.split_first() else {
        return usage("write FILE TEXT...");
    };
    match std::fs::write(file, text.join(" ")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasm-box: write: {file}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ls(dir: &str) -> ExitCode {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            eprintln!("wasm-box: ls: {dir}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let mut name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    name.push('/');
                }
                names.push(name);
            }
            Err(e) => {
                eprintln!("wasm-box: ls: {dir}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    names.sort();
    for name in names {
        println!("{name}");
    }
    ExitCode::SUCCESS
}

fn spin() -> ExitCode {
    let mut counter: u64 = 0;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

fn alloc(mib: usize) -> ExitCode {
    const MIB: usize = 1 << 20;
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(mib);
    for n in 1..=mib {
        // A non-zero fill writes every byte, so the memory is really used (not just reserved).
        let block = vec![(n as u8) | 1; MIB];
        blocks.push(std::hint::black_box(block));
        println!("allocated {n} MiB");
        let _ = io::stdout().flush();
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        std::hint::black_box(&blocks);
    }
}

fn clock() -> ExitCode {
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(10));
    let elapsed = start.elapsed();
    println!("monotonic {}", elapsed.as_nanos());
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => println!("wall {}.{:09}", since.as_secs(), since.subsec_nanos()),
        Err(e) => println!("wall -{:?}", e.duration()),
    }
    // std seeds RandomState from the host's random source (WASI `random_get` / wasi:random).
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    println!("random {:016x}", hasher.finish());
    ExitCode::SUCCESS
}

#[cfg(all(target_os = "wasi", target_env = "p2"))]
fn serve_once(args: &[String]) -> ExitCode {
    use std::io::Read;
    use std::net::TcpListener;

    let Some(Ok(port)) = args.first().map(|p| p.parse::<u16>()) else {
        return usage("serve-once PORT [TEXT...]");
    };
    let text = if args.len() > 1 {
        args[1..].join(" ")
    } else {
        "hello from wasm-box\n".to_string()
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("wasm-box: serve-once: bind 0.0.0.0:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    println!("listening on {port}");
    let _ = io::stdout().flush();
    let (mut stream, _) = match listener.accept() {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("wasm-box: serve-once: accept: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    if let Err(e) = stream
        .write_all(response.as_bytes())
        .and_then(|()| stream.flush())
    {
        eprintln!("wasm-box: serve-once: write: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(not(all(target_os = "wasi", target_env = "p2")))]
fn serve_once(_args: &[String]) -> ExitCode {
    eprintln!("wasm-box: serve-once: sockets need WASI p2 (build for wasm32-wasip2)");
    ExitCode::FAILURE
}
