//! The fuzzing harness of the agent's request handling, shared by
//! `fuzz/fuzz_targets/agent_requests.rs` and the test that replays its
//! inputs (`guest-agent/tests/fuzz_regressions.rs`). Not an API.
//!
//! The input is a request as the gRPC layer hands it to the service: a
//! protobuf message (the first byte picks which), decoded with prost. It
//! then goes through the checks the service makes before it acts — ids,
//! relative paths, CopyFile's path resolution, sysctl names, the network
//! configuration, the JSON documents the requests carry — and never further:
//! nothing here creates namespaces, mounts, writes files or starts
//! processes. What a check accepts is then asserted to be safe to use (an
//! accepted path stays where it must), so a check that lets a bad value
//! through is a crash too.

use std::path::{Component, Path};

use prost::Message;
use vmrun_proto::v1::{
    create_container_request::Rootfs, ConfigureNetworkRequest, CopyFileRequest,
    CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest, ExecProcessRequest,
    UpdateResourcesRequest,
};

fn no_parent(path: &Path) -> bool {
    !path.components().any(|c| c == Component::ParentDir)
}

/// Decodes and checks one request; `base` is a directory standing for the
/// pod directory CopyFile writes under (only looked at, never written).
/// Returns whether the request passed the checks.
pub fn request(data: &[u8], base: &Path) -> bool {
    let Some((&kind, message)) = data.split_first() else {
        return false;
    };
    match kind % 6 {
        0 => ConfigureNetworkRequest::decode(message).is_ok_and(|req| configure_network(&req)),
        1 => CopyFileRequest::decode(message).is_ok_and(|req| copy_file(&req, base)),
        2 => CreateContainerRequest::decode(message).is_ok_and(|req| create_container(&req)),
        3 => CreateSandboxRequest::decode(message).is_ok_and(|req| create_sandbox(&req)),
        4 => ExecProcessRequest::decode(message).is_ok_and(|req| {
            crate::containers::check_id("container", &req.container_id).is_ok()
                && check_id("exec", &req.exec_id)
                && serde_json::from_slice::<oci_spec::runtime::Process>(&req.process_json).is_ok()
        }),
        _ => {
            if let Ok(req) = DestroySandboxRequest::decode(message) {
                let _ = crate::sandbox::check_destroy(&req.sandbox_id, None);
            }
            UpdateResourcesRequest::decode(message).is_ok_and(|req| {
                serde_json::from_slice::<oci_spec::runtime::LinuxResources>(
                    &req.linux_resources_json,
                )
                .is_ok()
            })
        }
    }
}

/// An id the agent accepts names one directory entry of its own.
fn check_id(kind: &str, id: &str) -> bool {
    let ok = crate::containers::check_id(kind, id).is_ok();
    if ok {
        assert!(
            !id.contains('/') && !id.starts_with('.') && id != "..",
            "{kind} id {id:?} accepted"
        );
    }
    ok
}

fn configure_network(req: &ConfigureNetworkRequest) -> bool {
    let ok = crate::network::validate(req).is_ok();
    if ok {
        for interface in &req.interfaces {
            if !interface.mac.is_empty() {
                let mac = crate::network::parse_mac(&interface.mac).expect("validated MAC");
                assert_eq!(mac.len(), 6);
            }
            for address in &interface.addresses {
                let (ip, len) = crate::network::parse_cidr("address", address).expect("validated");
                assert!(len <= if ip.is_ipv4() { 32 } else { 128 });
            }
        }
    }
    ok
}

fn copy_file(req: &CopyFileRequest, base: &Path) -> bool {
    match crate::files::resolve(base, &req.path) {
        Ok(path) => {
            assert!(
                path.starts_with(base) && path != base && no_parent(&path),
                "CopyFile path {:?} resolved to {}",
                req.path,
                path.display()
            );
            true
        }
        Err(_) => false,
    }
}

fn create_container(req: &CreateContainerRequest) -> bool {
    if !check_id("container", &req.container_id) {
        return false;
    }
    if let Some(Rootfs::Image(disk)) = &req.rootfs {
        let mount_point = Path::new("/run/vmrun/images/fuzz");
        for layer in &disk.layers {
            if crate::containers::check_relative("image layer", layer).is_err() {
                return false;
            }
            let dir = mount_point.join(layer);
            assert!(
                dir.starts_with(mount_point) && no_parent(&dir),
                "layer {layer:?} leaves the image"
            );
        }
    }
    let Ok(mut spec) = serde_json::from_slice::<oci_spec::runtime::Spec>(&req.oci_spec_json) else {
        return false;
    };
    crate::containers::drop_proc_view_if_absent(&mut spec);
    true
}

fn create_sandbox(req: &CreateSandboxRequest) -> bool {
    for key in req.sysctls.keys() {
        let Some(path) = crate::sandbox::sysctl_path(key) else {
            return false;
        };
        assert!(
            path.starts_with("/proc/sys")
                && path.components().count() > 3
                && path
                    .components()
                    .skip(3)
                    .all(|c| matches!(c, Component::Normal(_))),
            "sysctl {key:?} maps to {}",
            path.display()
        );
    }
    true
}
