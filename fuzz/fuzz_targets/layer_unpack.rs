//! A layer blob (tar, gzip or zstd by magic bytes) unpacked into a fresh
//! directory; afterwards nothing may exist outside it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let inside = dir.path().join("inside");
    std::fs::create_dir(&inside).expect("inside dir");
    let blob = dir.path().join("blob");
    std::fs::write(&blob, data).expect("blob");
    let _ = vmrun_image::fuzzing::unpack_layer(&blob, &inside.join("tmp"), &inside.join("layer"));
    let outside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read temp dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "inside" && n != "blob")
        .collect();
    assert!(
        outside.is_empty(),
        "the layer wrote outside its directory: {outside:?}"
    );
});
