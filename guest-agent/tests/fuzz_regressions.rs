//! Replays the agent_requests fuzz target's inputs (`fuzz/`) through the
//! same harness (`vmrun_agent::fuzzing::request`): every crash input kept in
//! `fuzz/regressions/agent_requests/` and every seed in
//! `fuzz/seeds/agent_requests/`. The seeds are requests the host really
//! sends, so each of them must pass the agent's checks; the ones named
//! `bad-*` must not.

use std::path::Path;

fn files(kind: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join("agent_requests");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

#[test]
fn agent_requests() {
    let base = tempfile::tempdir().unwrap();
    for path in files("regressions") {
        vmrun_agent::fuzzing::request(&std::fs::read(&path).unwrap(), base.path());
    }
    let seeds = files("seeds");
    assert!(!seeds.is_empty(), "no seeds for agent_requests");
    let mut accepted = 0;
    for path in &seeds {
        let ok = vmrun_agent::fuzzing::request(&std::fs::read(path).unwrap(), base.path());
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("bad-") {
            assert!(!ok, "{name} passed the agent's checks");
        } else {
            assert!(ok, "{name}, a request the host sends, was refused");
            accepted += 1;
        }
    }
    assert!(
        accepted > 0,
        "no seed passed the agent's checks: the harness is broken"
    );
}
