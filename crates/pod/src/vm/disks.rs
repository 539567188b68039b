//! The block devices of a pod VM: one read-only disk per image, then one per
//! `hostPath` volume that names a file or a block device.
//!
//! The guest cannot see host directories (there is no shared filesystem
//! yet), so a `hostPath` reaches it only as a virtio-blk disk: the container
//! finds the guest's device node at the mount path, and reads and writes go
//! to the host file or device. Directories and other kinds are refused by
//! name.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::plan::{PodPlan, VolumeSource};
use crate::runtime::RuntimeError;

/// virtio-blk counts capacity in 512-byte sectors.
const SECTOR: u64 = 512;
/// vmrun-vmm has 19 virtio-mmio slots (IOAPIC lines 5 to 23, one each);
/// the pod VM's vsock and balloon take two: `/dev/vda` … `/dev/vdq`.
pub(super) const MAX_DISKS: usize = 17;

/// One `--disk` of the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The disks of one pod VM and the guest device each image or volume got.
#[derive(Debug, Default)]
pub(super) struct DiskPlan {
    pub disks: Vec<VmDisk>,
    /// Guest device of each image, by image reference.
    pub images: BTreeMap<String, String>,
    /// Guest device of each `hostPath` volume, by volume name.
    pub volumes: BTreeMap<String, String>,
}

/// `/dev/vda`, `/dev/vdb`, ...: the guest's names for the VMM's `--disk`s, in order.
pub(super) fn guest_disk(index: usize) -> Result<String, RuntimeError> {
    let letter = u8::try_from(index)
        .ok()
        .filter(|i| usize::from(*i) < MAX_DISKS)
        .ok_or_else(|| {
            RuntimeError::Sandbox(format!(
                "a pod VM takes at most {MAX_DISKS} disks (images and hostPath volumes), not {}",
                index + 1
            ))
        })?;
    Ok(format!("/dev/vd{}", char::from(b'a' + letter)))
}

impl DiskPlan {
    /// Images first (in the order containers name them), then hostPath volumes.
    pub(super) fn for_pod(
        pod: &PodPlan,
        image_disks: &BTreeMap<String, PathBuf>,
    ) -> Result<Self, RuntimeError> {
        let mut plan = DiskPlan::default();
        for c in pod.all_containers() {
            if plan.images.contains_key(&c.image) {
                continue;
            }
            let path = image_disks.get(&c.image).ok_or_else(|| {
                RuntimeError::Sandbox(format!(
                    "container {:?}: no block image was prepared for image {:?}",
                    c.name, c.image
                ))
            })?;
            let device = plan.push(path.clone(), true)?;
            plan.images.insert(c.image.clone(), device);
        }
        for v in &pod.volumes {
            if let VolumeSource::HostPath { path, kind } = &v.source {
                let disk = host_path_disk(pod, &v.name, Path::new(path), kind)?;
                let device = plan.push(disk.path, disk.read_only)?;
                plan.volumes.insert(v.name.clone(), device);
            }
        }
        Ok(plan)
    }

    fn push(&mut self, path: PathBuf, read_only: bool) -> Result<String, RuntimeError> {
        let device = guest_disk(self.disks.len())?;
        self.disks.push(VmDisk { path, read_only });
        Ok(device)
    }
}

/// A `hostPath` volume as a disk: read-only unless some container mounts it
/// writable.
fn host_path_disk(
    pod: &PodPlan,
    volume: &str,
    path: &Path,
    kind: &str,
) -> Result<VmDisk, RuntimeError> {
    let err = |msg: String| {
        RuntimeError::Sandbox(format!(
            "volume {volume:?}: hostPath {}: {msg}",
            path.display()
        ))
    };
    crate::native::check_host_path(volume, path, kind)?;
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let file_type = meta.file_type();
    let size = if file_type.is_file() {
        meta.len()
    } else if file_type.is_block_device() {
        // The VMM sizes a device itself; only files need whole sectors.
        0
    } else {
        let what = if file_type.is_dir() {
            "a directory"
        } else {
            "neither a file nor a block device"
        };
        return Err(err(format!(
            "is {what}: the vm runtime passes a hostPath to the guest only as a block \
             device, so it must be a file or a block device (host directories need a \
             shared filesystem, which the vm runtime does not have yet)"
        )));
    };
    if size % SECTOR != 0 {
        return Err(err(format!(
            "is {size} bytes, not a whole number of {SECTOR}-byte sectors: the vm runtime \
             passes it to the guest as a block device"
        )));
    }
    if path.to_string_lossy().contains(',') {
        return Err(err(
            "contains a comma, which the VMM's --disk option cannot take".into(),
        ));
    }
    let mut read_only = true;
    for c in pod.all_containers() {
        for m in c.mounts.iter().filter(|m| m.volume == volume) {
            if m.sub_path.is_some() {
                return Err(err(format!(
                    "container {:?} mounts a subPath of it: a hostPath reaches the vm \
                     runtime's guest as one block device, which has no paths inside",
                    c.name
                )));
            }
            read_only &= m.read_only;
        }
    }
    Ok(VmDisk {
        path: path.to_path_buf(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod with one busybox container mounting hostPath `path` at /disk.
    fn pod(path: &Path, mount_extra: &str) -> PodPlan {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  \
             - name: c\n    image: busybox\n    volumeMounts:\n    - name: h\n      \
             mountPath: /disk\n{mount_extra}  volumes:\n  - name: h\n    hostPath:\n      \
             path: {}\n",
            path.display()
        );
        let manifest = crate::manifest::parse("t.yaml", &yaml).unwrap();
        crate::plan::plan(&manifest, "uid", "node").unwrap()
    }

    fn images() -> BTreeMap<String, PathBuf> {
        BTreeMap::from([("busybox".to_string(), PathBuf::from("/img/busybox.erofs"))])
    }

    #[test]
    fn a_host_file_becomes_the_disk_after_the_images() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.img");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        let plan = DiskPlan::for_pod(&pod(&file, ""), &images()).unwrap();
        assert_eq!(
            plan.disks,
            [
                VmDisk {
                    path: "/img/busybox.erofs".into(),
                    read_only: true
                },
                VmDisk {
                    path: file.clone(),
                    read_only: false
                }
            ]
        );
        assert_eq!(plan.images["busybox"], "/dev/vda");
        assert_eq!(plan.volumes["h"], "/dev/vdb");

        let read_only = pod(&file, "      readOnly: true\n");
        let plan = DiskPlan::for_pod(&read_only, &images()).unwrap();
        assert!(plan.disks[1].read_only);
    }

    #[test]
    fn directories_odd_sizes_and_sub_paths_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = DiskPlan::for_pod(&pod(dir.path(), ""), &images())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("volume \"h\"") && e.contains("is a directory"),
            "{e}"
        );
        assert!(e.contains("shared filesystem"), "{e}");

        let odd = dir.path().join("odd");
        std::fs::write(&odd, b"not a sector").unwrap();
        let e = DiskPlan::for_pod(&pod(&odd, ""), &images())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("12 bytes") && e.contains("512-byte sectors"),
            "{e}"
        );

        let file = dir.path().join("ok.img");
        std::fs::write(&file, vec![0u8; 512]).unwrap();
        let e = DiskPlan::for_pod(&pod(&file, "      subPath: x\n"), &images())
            .unwrap_err()
            .to_string();
        assert!(e.contains("subPath"), "{e}");

        let missing = dir.path().join("missing");
        let e = DiskPlan::for_pod(&pod(&missing, ""), &images())
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn devices_are_lettered_in_order_up_to_the_vmms_free_slots() {
        assert_eq!(guest_disk(0).unwrap(), "/dev/vda");
        assert_eq!(guest_disk(16).unwrap(), "/dev/vdq");
        let e = guest_disk(17).unwrap_err().to_string();
        assert!(e.contains("at most 17 disks"), "{e}");
    }
}
