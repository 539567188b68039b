//! The vmrun virtual machine monitor. Its KVM boot path and virtio devices arrive with the VMM issue.
