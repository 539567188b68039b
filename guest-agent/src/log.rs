//! Logging with a `vmrun-agent:` prefix: to stderr until /dev is mounted,
//! then to /dev/kmsg (the kernel log, printed on the guest console with the
//! kernel's timestamps). Boot the guest with `printk.devkmsg=on`, or the
//! kernel rate-limits userspace lines (10 per 5 s).

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

static KMSG: Mutex<Option<File>> = Mutex::new(None);

/// Installs the global subscriber (INFO and up). Call once, first thing.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(Level::INFO)
        .with_writer(Sink)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
}

/// From now on, log to /dev/kmsg. Fails (and logging stays on stderr)
/// without a mounted /dev.
pub fn use_kmsg() -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open("/dev/kmsg")?;
    *KMSG.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

struct Sink;

/// Collects one event and writes it as a single record on drop: /dev/kmsg
/// takes one record per write(2).
pub struct Line {
    priority: u8,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim_end();
        let mut kmsg = KMSG.lock().unwrap_or_else(|e| e.into_inner());
        let _ = match kmsg.as_mut() {
            // "<N>" sets the record's syslog priority.
            Some(f) => f.write_all(format!("<{}>vmrun-agent: {text}\n", self.priority).as_bytes()),
            None => std::io::stderr().write_all(format!("vmrun-agent: {text}\n").as_bytes()),
        };
    }
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 5,
        _ => 7,
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            priority: 5,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            priority: priority(meta.level()),
            buf: Vec::new(),
        }
    }
}
