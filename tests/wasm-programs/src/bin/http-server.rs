//! `http-server PORT [TEXT]`: a minimal HTTP/1.0 server for the wasm runtime's tests (built for
//! wasm32-wasip2, where std's `TcpListener` sits on wasi:sockets).
//!
//! Binds 0.0.0.0:PORT (PORT 0 picks a free port), prints `listening on PORT` (the bound port)
//! to stdout, then serves connections one after another forever: reads the request head (up to
//! the blank line, 64 KiB at most), answers `200 OK` with `Content-Type: text/plain` and TEXT
//! (default `hello from wasm\n`) as the body, and closes the connection. Each request is logged
//! to stderr as `request: LINE`. A failed bind prints the error to stderr and exits 1.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;

const MAX_HEAD: usize = 64 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(Ok(port)) = args.get(1).map(|p| p.parse::<u16>()) else {
        eprintln!("usage: http-server PORT [TEXT]");
        return ExitCode::from(2);
    };
    let text = match args.get(2) {
        Some(text) => text.clone(),
        None => "hello from wasm\n".to_string(),
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("http-server: bind 0.0.0.0:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    println!("listening on {port}");
    let _ = io::stdout().flush();
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve(stream, response.as_bytes()) {
                    eprintln!("http-server: connection: {e}");
                }
            }
            Err(e) => eprintln!("http-server: accept: {e}"),
        }
    }
}

fn serve(mut stream: TcpStream, response: &[u8]) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first_line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    eprintln!("request: {}", String::from_utf8_lossy(first_line));
    stream.write_all(response)?;
    stream.flush()
}
