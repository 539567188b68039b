//! Container output: CRI log files (what `kubectl logs` reads on a node), a
//! per-container prefixed stream on the terminal, and a live tap of the raw
//! bytes for whoever follows the output as it comes (CRI Attach).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;

/// Lines longer than this are split into partial (`P`) records, as the kubelet does.
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A piece of a container's output as it was read, before any line
/// splitting: an attached terminal needs a prompt that has no newline yet.
#[derive(Debug, Clone)]
pub struct OutputChunk {
    pub stream: Stream,
    pub data: Arc<[u8]>,
}

/// Live followers of a container's output subscribe here. A broadcast, so a
/// slow follower lags (and learns it) instead of stalling the container
/// and its log.
pub type OutputTap = tokio::sync::broadcast::Sender<OutputChunk>;

/// Where one container attempt's output goes.
#[derive(Clone)]
pub struct LogTarget {
    pub file: Arc<Mutex<std::fs::File>>,
    /// `Some(prefix)` to echo to this process's stdout/stderr.
    pub terminal_prefix: Option<String>,
    /// Also sends every chunk read here, as read.
    pub tap: Option<OutputTap>,
    /// The file's path (for warnings) and the records lost to a full disk since the last
    /// one written.
    path: Arc<Mutex<PathBuf>>,
    lost: Arc<AtomicU64>,
}

impl LogTarget {
    pub fn create(path: &Path, terminal_prefix: Option<String>) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
            terminal_prefix,
            tap: None,
            path: Arc::new(Mutex::new(path.to_path_buf())),
            lost: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The same target, also sending what it gets to `tap`.
    pub fn with_tap(mut self, tap: OutputTap) -> Self {
        self.tap = Some(tap);
        self
    }

    fn send_to_tap(&self, stream: Stream, data: &[u8]) {
        if let Some(tap) = &self.tap {
            // Fails only when nobody follows right now: nothing to do then.
            let _ = tap.send(OutputChunk {
                stream,
                data: Arc::from(data),
            });
        }
    }

    /// Points the target at a fresh file at `path` (the old one may have been
    /// rotated away): CRI's ReopenContainerLog.
    pub fn reopen(&self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = file;
        *self.path.lock().unwrap_or_else(|p| p.into_inner()) = path.to_path_buf();
        Ok(())
    }

    /// Appends one record. A full disk must not stop the container (the terminal still shows
    /// its output), nor leave half a record: what did not fit is cut off again, so the file
    /// stays whole records with a gap; the first record lost and the first written again
    /// after it say so.
    fn append(&self, file: &mut std::fs::File, record: &[u8]) {
        let mut written = 0;
        let error = loop {
            match file.write(&record[written..]) {
                Ok(0) => break std::io::Error::from(std::io::ErrorKind::WriteZero),
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break e,
            }
            if written == record.len() {
                let lost = self.lost.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    tracing::warn!(
                        "log {}: {lost} records lost while it could not be written",
                        self.path
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .display()
                    );
                }
                return;
            }
        };
        if written > 0 {
            if let Ok(len) = file.metadata().map(|m| m.len()) {
                let _ = file.set_len(len.saturating_sub(written as u64));
            }
        }
        if self.lost.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "log {}: {error}; records are dropped until it can be written again",
                self.path
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .display()
            );
        }
    }

    fn record(&self, stream: Stream, line: &[u8], partial: bool) {
        let stamp = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.9fZ");
        let tag = if partial { "P" } else { "F" };
        let mut record = format!("{stamp} {} {tag} ", stream.as_str()).into_bytes();
        record.extend_from_slice(line);
        record.push(b'\n');
        if let Ok(mut file) = self.file.lock() {
            self.append(&mut file, &record);
        }
        if let Some(prefix) = &self.terminal_prefix {
            let mut text = format!("[{prefix}] ").into_bytes();
            text.extend_from_slice(line);
            if !partial {
                text.push(b'\n');
            }
            let _ = match stream {
                Stream::Stdout => std::io::stdout().lock().write_all(&text),
                Stream::Stderr => std::io::stderr().lock().write_all(&text),
            };
        }
    }
}

/// The write ends a container's stdout and stderr get, and the tasks that
/// copy what arrives into `target` (they end when every writer has closed).
pub struct OutputPipes {
    pub stdout: std::os::fd::OwnedFd,
    pub stderr: std::os::fd::OwnedFd,
    pub pumps: [tokio::task::JoinHandle<()>; 2],
}

/// Makes a container's output pipes; needs a tokio runtime.
pub fn output_pipes(target: LogTarget) -> std::io::Result<OutputPipes> {
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from);
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let out_r = tokio::net::unix::pipe::Receiver::from_owned_fd(out_r)?;
    let err_r = tokio::net::unix::pipe::Receiver::from_owned_fd(err_r)?;
    Ok(OutputPipes {
        stdout: out_w,
        stderr: err_w,
        pumps: [
            tokio::spawn(pump(out_r, Stream::Stdout, target.clone())),
            tokio::spawn(pump(err_r, Stream::Stderr, target)),
        ],
    })
}

/// Copies a pipe into the log target until EOF.
pub async fn pump(reader: tokio::net::unix::pipe::Receiver, stream: Stream, target: LogTarget) {
    let mut reader = reader;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 8192];
    // Whether the last record was a `P`: the line it began is not done.
    let mut partial_line = false;
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        target.send_to_tap(stream, &chunk[..n]);
        pending.extend_from_slice(&chunk[..n]);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            target.record(stream, line_content(&line), false);
            partial_line = false;
        }
        while pending.len() >= MAX_LINE {
            let part: Vec<u8> = pending.drain(..MAX_LINE).collect();
            target.record(stream, &part, true);
            partial_line = true;
        }
    }
    // The last line ends with an `F` record even when the container did not
    // end it, also when all of it went out in `P` records already (a last
    // line of a multiple of MAX_LINE bytes): otherwise the log would end
    // in a line that never finishes. Found by fuzzing
    // (fuzz/regressions/cri_log/eof-after-whole-partial-records).
    if !pending.is_empty() || partial_line {
        target.record(stream, &pending, false);
    }
}

/// A complete line without its end: `\n`, or `\r\n` as a terminal writes
/// it (containerd drops both, so a tty's log reads like a pipe's).
fn line_content(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// One parsed CRI log record.
#[derive(Debug, PartialEq)]
pub struct Record<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    pub partial: bool,
    pub content: &'a str,
}

pub fn parse_record(line: &str) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let content = parts.next().unwrap_or("");
    Some(Record {
        time,
        stream,
        partial: tag == "P",
        content,
    })
}

/// The log file of a container attempt inside a pod directory (kubelet layout).
pub fn log_path(pod_dir: &Path, container: &str, attempt: u32) -> PathBuf {
    pod_dir
        .join("logs")
        .join(container)
        .join(format!("{attempt}.log"))
}

/// The fuzzing harness of the log writer, shared by `fuzz/fuzz_targets/cri_log.rs`
/// and the test that replays its inputs. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use super::{parse_record, pump, LogTarget, Stream, MAX_LINE};

    /// Decodes the input into the bytes a container writes and the writes
    /// it makes them in: after a first byte choosing the stream, ops of
    /// literal bytes (up to 255), a run of one byte (up to 65535, for huge
    /// lines from small inputs), `\r\n`, or `\n`. Returns the writes.
    pub fn writes(data: &[u8]) -> (Stream, Vec<Vec<u8>>) {
        let stream = match data.first() {
            Some(b) if b & 1 == 1 => Stream::Stderr,
            _ => Stream::Stdout,
        };
        let mut writes = Vec::new();
        let mut rest = data.get(1..).unwrap_or_default();
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            head
        };
        while let Some(&op) = take(1).first() {
            let write = match op % 4 {
                0 => {
                    let len = take(1).first().copied().unwrap_or(0);
                    take(usize::from(len)).to_vec()
                }
                1 => {
                    let byte = take(1).first().copied().unwrap_or(b'x');
                    let count = take(2);
                    let count = u16::from_le_bytes([
                        count.first().copied().unwrap_or(0),
                        count.get(1).copied().unwrap_or(0),
                    ]);
                    vec![byte; usize::from(count)]
                }
                2 => b"\r\n".to_vec(),
                _ => b"\n".to_vec(),
            };
            writes.push(write);
        }
        (stream, writes)
    }

    /// Writes what the input decodes to through a pipe into [`pump`], which
    /// logs it to `dir/0.log`, then checks the file: every line is a CRI
    /// record `TIMESTAMP STREAM P|F CONTENT` of the right stream, `P`
    /// records are exactly [`MAX_LINE`] long, and the contents give back
    /// every byte written, in order (`F` adding the newline, a terminal's
    /// `\r\n` maybe without its `\r`; the last line gets one even when
    /// the container did not end it). Returns the number of records.
    pub fn log_writer(data: &[u8], dir: &Path) -> usize {
        let (stream, writes) = writes(data);
        let path = dir.join("0.log");
        let _ = std::fs::remove_file(&path);
        let target = LogTarget::create(&path, None).expect("log file");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let written: Vec<u8> = writes.concat();
        runtime.block_on(async {
            let (tx, rx) = tokio::net::unix::pipe::pipe().expect("pipe");
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut tx = tx;
                for write in writes {
                    tx.write_all(&write).await.expect("write to the pipe");
                }
            });
            pump(rx, stream, target).await;
            writer.await.expect("writer task");
        });
        let log = std::fs::read(&path).expect("read the log");
        let mut content = Vec::new();
        let mut records = 0;
        let lines = log.strip_suffix(b"\n").map(|l| l.split(|b| *b == b'\n'));
        assert!(
            lines.is_some() || log.is_empty(),
            "the log does not end in a newline"
        );
        for line in lines.into_iter().flatten() {
            records += 1;
            // Container output need not be UTF-8; the record's frame is.
            let frame_end = line
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b' ')
                .nth(2)
                .map(|(i, _)| i + 1)
                .unwrap_or(line.len());
            let frame = std::str::from_utf8(&line[..frame_end]).expect("a UTF-8 record frame");
            let record = parse_record(frame).expect("a CRI record");
            assert!(
                chrono::DateTime::parse_from_rfc3339(record.time).is_ok()
                    && record.time.ends_with('Z'),
                "timestamp {:?}",
                record.time
            );
            assert_eq!(record.stream, stream.as_str());
            let tag = frame.split(' ').nth(2);
            assert!(matches!(tag, Some("P") | Some("F")), "tag {tag:?}");
            let text = &line[frame_end..];
            if record.partial {
                assert_eq!(
                    text.len(),
                    MAX_LINE,
                    "a partial record of {} bytes",
                    text.len()
                );
            }
            content.extend_from_slice(text);
            if !record.partial {
                content.push(b'\n');
            }
        }
        let mut expected = written;
        if !expected.is_empty() && !expected.ends_with(b"\n") {
            expected.push(b'\n');
        }
        assert!(
            same_but_terminal_line_ends(&expected, &content),
            "the log's contents differ from what was written"
        );
        records
    }

    /// Whether `content` is `written` with, at most, the `\r` of some
    /// `\r\n` line ends dropped (a terminal's line end, which the log
    /// writes as a pipe's; whether one is dropped depends on where the
    /// pipe's reads split a long line, so either is right).
    fn same_but_terminal_line_ends(written: &[u8], content: &[u8]) -> bool {
        let (mut i, mut j) = (0, 0);
        while i < written.len() {
            if j < content.len() && written[i] == content[j] {
                (i, j) = (i + 1, j + 1);
            } else if written[i] == b'\r' && written.get(i + 1) == Some(&b'\n') {
                i += 1;
            } else {
                return false;
            }
        }
        j == content.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_cri_records_and_splits_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let target = LogTarget::create(&path, None).unwrap();
        let (tx, rx) = tokio::net::unix::pipe::pipe().unwrap();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut tx = tx;
            tx.write_all(b"hello\nworld").await.unwrap();
            tx.write_all(&vec![b'x'; MAX_LINE + 10]).await.unwrap();
        });
        pump(rx, Stream::Stderr, target).await;
        writer.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<_> = text.lines().map(|l| parse_record(l).unwrap()).collect();
        assert_eq!(records[0].content, "hello");
        assert_eq!(records[0].stream, "stderr");
        assert!(!records[0].partial);
        assert!(records[1].partial);
        assert_eq!(records[1].content.len(), MAX_LINE);
        assert!(records[1].content.starts_with("world"));
        assert_eq!(records[2].content.len(), 15);
        assert!(records[0].time.ends_with('Z'));
    }

    #[tokio::test]
    async fn the_tap_gets_raw_chunks_and_terminal_line_ends_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let (tap, mut follower) = tokio::sync::broadcast::channel(16);
        let target = LogTarget::create(&path, None).unwrap().with_tap(tap);
        let (tx, rx) = tokio::net::unix::pipe::pipe().unwrap();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut tx = tx;
            tx.write_all(b"one\r\n/ # ").await.unwrap();
        });
        pump(rx, Stream::Stdout, target).await;
        writer.await.unwrap();
        let mut raw = Vec::new();
        while let Ok(chunk) = follower.try_recv() {
            assert_eq!(chunk.stream, Stream::Stdout);
            raw.extend_from_slice(&chunk.data);
        }
        // The follower sees the prompt that the log only gets at EOF.
        assert_eq!(raw, b"one\r\n/ # ");
        let text = std::fs::read_to_string(&path).unwrap();
        let contents: Vec<_> = text
            .lines()
            .map(|l| parse_record(l).unwrap().content.to_string())
            .collect();
        assert_eq!(contents, ["one", "/ # "]);
    }

    /// Replays the cri_log fuzz target's kept crash inputs
    /// (`fuzz/regressions/cri_log`) and its seeds (`fuzz/seeds/cri_log`)
    /// through the same harness, which checks every record it wrote.
    #[test]
    fn fuzz_inputs_give_well_formed_records() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
        let mut seeds = 0;
        let mut records = 0;
        for kind in ["regressions", "seeds"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join("cri_log")) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let dir = tempfile::tempdir().unwrap();
                let n = fuzzing::log_writer(&std::fs::read(&path).unwrap(), dir.path());
                if kind == "seeds" {
                    seeds += 1;
                    records += n;
                }
            }
        }
        assert!(seeds > 0, "no seeds for cri_log");
        assert!(records > seeds, "the seeds gave {records} records");
    }
}
