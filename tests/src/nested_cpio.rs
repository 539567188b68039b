//! A minimal writer for `newc` cpio archives, the format Linux unpacks as an initramfs.
//! Enough for the nested test environment's initramfs images: directories, regular files,
//! symlinks and character devices, all owned by root.

const MODE_DIR: u32 = 0o040_000;
const MODE_FILE: u32 = 0o100_000;
const MODE_SYMLINK: u32 = 0o120_000;
const MODE_CHAR_DEVICE: u32 = 0o020_000;

/// An initramfs under construction. Parents must be added before their children.
#[derive(Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory with mode `0755`.
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, MODE_DIR | 0o755, (0, 0), &[])
    }

    /// A regular file with the permission bits `mode` (e.g. `0o755`).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, MODE_FILE | (mode & 0o7777), (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, MODE_SYMLINK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node, e.g. `/dev/console` (5, 1).
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(
            path,
            MODE_CHAR_DEVICE | (mode & 0o7777),
            (major, minor),
            &[],
        )
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> &mut Self {
        let name = path.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        self.next_inode += 1;
        let is_trailer = name == "TRAILER!!!";
        let fields: [u32; 13] = [
            if is_trailer { 0 } else { self.next_inode },
            mode,
            0, // uid
            0, // gid
            if mode & MODE_DIR == MODE_DIR { 2 } else { 1 },
            0, // mtime: fixed, so equal inputs give equal archives
            u32::try_from(data.len()).expect("initramfs entries are below 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            (name.len() + 1) as u32,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
        self
    }

    fn pad(&mut self) {
        let aligned = self.bytes.len().next_multiple_of(4);
        self.bytes.resize(aligned, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_end_with_the_trailer() {
        let mut cpio = Cpio::new();
        cpio.dir("/bin")
            .file("/bin/hello", 0o755, b"hello")
            .symlink("/bin/sh", "hello");
        let bytes = cpio.finish();
        assert_eq!(bytes.len(), bytes.len().next_multiple_of(4));
        assert_eq!(&bytes[..6], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/hello\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file's header: mode 0100755, size 5.
        let at = text.find("bin/hello").unwrap() - 110;
        assert_eq!(&text[at + 14..at + 22], "000081ed");
        assert_eq!(&text[at + 54..at + 62], "00000005");
    }
}
