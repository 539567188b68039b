//! Replays the inputs of the virtio fuzz targets (`fuzz/`) through the same
//! harnesses (`vmrun_vmm::fuzzing`): every crash input kept in
//! `fuzz/regressions/TARGET/` and every seed in `fuzz/seeds/TARGET/`. A
//! crash the fuzzer found fails here until its fix is in; the seeds show
//! the harness still drives the device (they are requests a correct driver
//! makes, so the device must serve some of them).

use std::path::{Path, PathBuf};

use vmrun_vmm::fuzzing;

fn inputs(target: &str, kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `harness` over the target's regression inputs and seeds; the seeds
/// must exist and, together, get something served.
fn replay(target: &str, harness: impl Fn(&[u8]) -> u64) {
    for path in inputs(target, "regressions") {
        eprintln!("regression {}", path.display());
        harness(&std::fs::read(&path).unwrap());
    }
    let seeds = inputs(target, "seeds");
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let mut served = 0;
    for path in seeds {
        eprintln!("seed {}", path.display());
        let done = harness(&std::fs::read(&path).unwrap());
        eprintln!("  served {done}");
        served += done;
    }
    assert!(
        served > 0,
        "the {target} device served none of its seeds: the harness no longer drives it"
    );
}

#[test]
fn virtio_block() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    replay("virtio_block", |data| fuzzing::block_queue(data, &disk));
}

#[test]
fn virtio_balloon() {
    replay("virtio_balloon", fuzzing::balloon_queues);
}

#[test]
fn virtio_net() {
    replay("virtio_net", fuzzing::net_queues);
}

#[test]
fn virtio_vsock() {
    let dir = tempfile::tempdir().unwrap();
    replay("virtio_vsock", |data| {
        fuzzing::vsock_queues(data, dir.path())
    });
}

#[test]
fn virtio_mmio() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    replay("virtio_mmio", |data| fuzzing::mmio_accesses(data, &disk));
}
