//! vmrun's virtual machine monitor: boots a Linux kernel in a KVM microVM
//! with a serial console, an MP table for SMP, and virtio-mmio devices.
//!
//! [`hypervisor`] is the seam to KVM (and to a scripted fake for tests);
//! [`vm::MicroVm`] builds a VM from a [`config::VmConfig`] and runs it until
//! the guest stops, reporting a [`stop::GuestStop`].

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod hypervisor;
pub mod jail;
pub mod kick;
pub mod memory;
pub mod pause;
pub mod seccomp;
pub mod spawner;
pub mod stop;
pub mod vcpu_loop;
pub mod virtio_slots;
pub mod vm;
