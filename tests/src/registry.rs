//! A throwaway local OCI registry: Debian's `docker-registry` (distribution 2.x) on a free
//! loopback port with its storage in a temp dir.
//!
//! The registry runs under a tiny `sh` watchdog that holds the read end of a pipe from us: when
//! the `Registry` is dropped *or this process dies for any reason* (including SIGKILL, or a
//! registry kept in a `static` that is never dropped), the pipe closes and the watchdog kills
//! the registry and deletes its directory. No registry outlives its test process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Watchdog: start the registry, report its pid, wait for stdin to close, then clean up.
const WATCHDOG: &str = r#"
"$0" serve "$1/config.yml" </dev/null >"$1/registry.log" 2>&1 &
pid=$!
echo "$pid"
read _ignored
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$1"
"#;

/// A running registry. Dropping it stops the registry and removes its storage.
pub struct Registry {
    addr: String,
    dir: PathBuf,
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

impl Registry {
    /// Starts a registry on 127.0.0.1 with a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Starts a registry on another loopback address (e.g. 127.0.0.2, which is *not* one of
    /// the addresses the store talks plain HTTP to by default).
    pub fn start_on(ip: Ipv4Addr) -> anyhow::Result<Self> {
        Self::start_with(ip, None)
    }

    /// Starts a registry on 127.0.0.1 that requires HTTP basic auth as `user`; `bcrypt_hash`
    /// is the password's bcrypt hash (htpasswd format, `$2y$`/`$2b$`).
    pub fn start_with_basic_auth(user: &str, bcrypt_hash: &str) -> anyhow::Result<Self> {
        Self::start_with(Ipv4Addr::LOCALHOST, Some((user, bcrypt_hash)))
    }

    fn start_with(ip: Ipv4Addr, auth: Option<(&str, &str)>) -> anyhow::Result<Self> {
        // The port is found by binding :0 and released before the registry binds it, so
        // another process may grab it in between; retry on that (rare) race.
        let mut last_err = None;
        for _ in 0..5 {
            match Self::try_start(ip, auth) {
                Ok(r) => return Ok(r),
                Err(e) if format!("{e:#}").contains("address already in use") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("could not start registry")))
    }

    fn try_start(ip: Ipv4Addr, auth: Option<(&str, &str)>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing (apt-get install docker-registry)"
        );
        let port = TcpListener::bind((ip, 0))
            .with_context(|| format!("finding a free port on {ip}"))?
            .local_addr()?
            .port();
        let addr = format!("{ip}:{port}");
        let dir = tempfile::Builder::new()
            .prefix("vmrun-registry-")
            .tempdir()?
            .keep();
        let auth_config = match auth {
            Some((user, hash)) => {
                std::fs::write(dir.join("htpasswd"), format!("{user}:{hash}\n"))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: vmrun-test\n    path: {}\n",
                    dir.join("htpasswd").display()
                )
            }
            None => String::new(),
        };
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n  secret: vmrun-test-secret\n",
            root = dir.join("data").display()
        );
        config.push_str(&auth_config);
        std::fs::write(dir.join("config.yml"), config)?;
        let mut watchdog = Command::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(REGISTRY_BIN)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the registry watchdog")?;
        let stdin = watchdog.stdin.take();
        let mut registry = Registry {
            addr,
            dir,
            watchdog,
            stdin,
        };
        let mut line = String::new();
        if let Some(out) = registry.watchdog.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let pid: u32 = line
            .trim()
            .parse()
            .with_context(|| format!("registry watchdog printed {line:?} instead of a pid"))?;
        registry.wait_ready(pid)?;
        Ok(registry)
    }

    /// Polls `GET /v2/` until the registry answers (200, or 401 with auth), the registry dies, or time runs out.
    fn wait_ready(&self, pid: u32) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.v2_ok() {
                return Ok(());
            }
            // The registry is the watchdog's child, not ours; /proc tells whether it still runs.
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            });
            if !alive {
                bail!(
                    "registry on {} exited at startup: {}",
                    self.addr,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "registry on {} not ready after {READY_TIMEOUT:?}: {}",
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn v2_ok(&self) -> bool {
        let Ok(sock) = self.addr.parse() else {
            return false;
        };
        let Ok(mut conn) = TcpStream::connect_timeout(&sock, Duration::from_millis(500)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        if conn.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = conn.take(64).read_to_string(&mut response);
        // Go answers an HTTP/1.0 request as HTTP/1.0; 401 is "up, but wants credentials"
        // (basic-auth registries).
        let mut status = response.split_whitespace();
        status.next().is_some_and(|v| v.starts_with("HTTP/1."))
            && status
                .next()
                .is_some_and(|code| code == "200" || code == "401")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// `host:port` of the registry, as used in image references.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Where the registry keeps a blob's bytes (distribution's filesystem layout), for tests
    /// that tamper with stored content.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog kill the registry and remove its directory.
        drop(self.stdin.take());
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
