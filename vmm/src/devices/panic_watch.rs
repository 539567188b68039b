//! Watches the guest's serial output for Linux's panic line, whatever the
//! console's destination (even `off`): with `panic=-1` a panicking kernel
//! resets, which otherwise looks exactly like a clean `reboot=k` stop.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// What Linux prints first when it panics.
pub const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Longest console line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 512;

/// The first panic line the guest printed, shared with whoever decides the
/// VM's outcome.
#[derive(Clone, Debug, Default)]
pub struct PanicLine(Arc<Mutex<Option<String>>>);

impl PanicLine {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).trim_end().to_owned();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    }
}

/// A console writer that passes everything through and records the panic
/// line (from the marker to the end of the line).
pub struct PanicWatch {
    inner: Box<dyn Write + Send>,
    line: Vec<u8>,
    /// Where the marker starts in `line`, once seen.
    marker_at: Option<usize>,
    /// The first panic line is complete: later ones are not recorded.
    done: bool,
    seen: PanicLine,
}

impl PanicWatch {
    pub fn new(inner: Box<dyn Write + Send>, seen: PanicLine) -> Self {
        PanicWatch {
            inner,
            line: Vec::new(),
            marker_at: None,
            done: false,
            seen,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &byte in buf {
            if self.done {
                return;
            }
            if byte == b'\n' {
                if let Some(at) = self.marker_at {
                    self.seen.set(&self.line[at..]);
                    self.done = true;
                }
                self.line.clear();
                continue;
            }
            if self.line.len() < MAX_LINE {
                self.line.push(byte);
            }
            if self.marker_at.is_none() && self.line.ends_with(PANIC_MARKER) {
                self.marker_at = Some(self.line.len() - PANIC_MARKER.len());
            }
        }
        // A reset may come before the newline: keep the line so far.
        if let (Some(at), false) = (self.marker_at, self.done) {
            self.seen.set(&self.line[at..]);
        }
    }
}

impl Write for PanicWatch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_panic_line_from_the_marker() {
        let seen = PanicLine::default();
        let mut watch = PanicWatch::new(Box::new(io::sink()), seen.clone());
        watch
            .write_all(b"[    0.1] booting\n[    1.2] Kernel panic")
            .unwrap();
        assert_eq!(seen.get(), None);
        watch
            .write_all(b" - not syncing: VFS: Unable to mount root fs\r\nlater\n")
            .unwrap();
        watch
            .write_all(b"Kernel panic - not syncing: second\n")
            .unwrap();
        assert_eq!(
            seen.get().as_deref(),
            Some("Kernel panic - not syncing: VFS: Unable to mount root fs")
        );
    }

    #[test]
    fn a_line_cut_short_by_the_reset_is_still_recorded() {
        let seen = PanicLine::default();
        let mut watch = PanicWatch::new(Box::new(io::sink()), seen.clone());
        watch
            .write_all(b"Kernel panic - not syncing: Attempted to kill init")
            .unwrap();
        assert_eq!(
            seen.get().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init")
        );
    }
}
