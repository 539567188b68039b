//! The virtio-mmio transport driven register by register the way Linux's
//! virtio_mmio driver does, with a virtio-blk device behind it (and a
//! virtio-balloon, whose third queue exists only with a feature).

use std::io::Write;
use std::sync::Arc;

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmrun_vmm::devices::bus::BusDevice;
use vmrun_vmm::devices::virtio::balloon::{Balloon, VIRTIO_BALLOON_F_REPORTING};
use vmrun_vmm::devices::virtio::block::Block;
use vmrun_vmm::devices::virtio::mmio::MmioTransport;
use vmrun_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};

const BASE: u64 = 0xd000_0000;
const QUEUE_ADDR: u64 = 0x1000;

struct Driver {
    transport: MmioTransport,
    irq: EventFd,
    memory: GuestMemoryMmap,
    _disk: tempfile::NamedTempFile,
}

impl Driver {
    fn new() -> Driver {
        let mut disk = tempfile::NamedTempFile::new().unwrap();
        for sector in 0..8u8 {
            disk.write_all(&[sector; 512]).unwrap();
        }
        let block = Block::open(disk.path(), false, "disk").unwrap();
        Driver::with_device(Box::new(block), disk)
    }

    fn with_device(device: Box<dyn VirtioDevice>, disk: tempfile::NamedTempFile) -> Driver {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let transport = MmioTransport::new(device, memory.clone(), interrupt);
        Driver {
            transport,
            irq,
            memory,
            _disk: disk,
        }
    }

    fn read(&mut self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(BASE, u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u32, value: u32) {
        self.transport
            .write(BASE, u64::from(offset), &value.to_le_bytes());
    }

    fn negotiate(&mut self, features_high: u32) {
        self.negotiate_all(features_high, 0);
    }

    fn negotiate_all(&mut self, features_high: u32, features_low: u32) {
        self.write(VIRTIO_MMIO_STATUS, 0);
        self.write(VIRTIO_MMIO_STATUS, ACK);
        self.write(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, features_high);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, features_low);
        self.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
    }

    fn set_up_queue(&mut self, mock: &MockSplitQueue<'_, GuestMemoryMmap>, size: u32) {
        self.set_up_queue_at(0, mock, size);
    }

    fn set_up_queue_at(
        &mut self,
        index: u32,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        size: u32,
    ) {
        self.write(VIRTIO_MMIO_QUEUE_SEL, index);
        self.write(VIRTIO_MMIO_QUEUE_NUM, size);
        self.write(VIRTIO_MMIO_QUEUE_DESC_LOW, mock.desc_table_addr().0 as u32);
        self.write(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        self.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, mock.avail_addr().0 as u32);
        self.write(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        self.write(VIRTIO_MMIO_QUEUE_USED_LOW, mock.used_addr().0 as u32);
        self.write(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        self.write(VIRTIO_MMIO_QUEUE_READY, 1);
    }
}

#[test]
fn identifies_as_a_version_2_block_device() {
    let mut driver = Driver::new();
    assert_eq!(driver.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(driver.read(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(driver.read(VIRTIO_MMIO_DEVICE_ID), 2);
    driver.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        driver.read(VIRTIO_MMIO_DEVICE_FEATURES) & 1,
        1,
        "VIRTIO_F_VERSION_1"
    );
    driver.write(VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(driver.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    driver.write(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(driver.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "only one queue");
    // Capacity in the configuration space, read in two halves.
    assert_eq!(driver.read(VIRTIO_MMIO_CONFIG), 8);
    assert_eq!(driver.read(VIRTIO_MMIO_CONFIG + 4), 0);
}

#[test]
fn features_without_version_1_are_refused() {
    let mut driver = Driver::new();
    driver.negotiate(0);
    assert_eq!(driver.read(VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
    driver.negotiate(1);
    assert_ne!(driver.read(VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
}

#[test]
fn a_request_travels_from_notify_to_interrupt() {
    let mut driver = Driver::new();
    let memory = driver.memory.clone();
    let mock = MockSplitQueue::create(&memory, GuestAddress(QUEUE_ADDR), 16);
    driver.negotiate(1);
    driver.set_up_queue(&mock, 16);
    driver.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(driver.transport.is_activated());

    memory
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x10_0000))
        .unwrap();
    memory.write_obj(5u64, GuestAddress(0x10_0008)).unwrap();
    let write = VRING_DESC_F_WRITE as u16;
    mock.build_desc_chain(&[
        RawDescriptor::from(Descriptor::new(0x10_0000, 16, 0, 0)),
        RawDescriptor::from(Descriptor::new(0x20_0000, 512, write, 0)),
        RawDescriptor::from(Descriptor::new(0x30_0000, 1, write, 0)),
    ])
    .unwrap();
    driver.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    assert_eq!(driver.irq.read().unwrap(), 1);
    assert_eq!(
        driver.read(VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(memory.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    assert_eq!(memory.read_obj::<u8>(GuestAddress(0x20_01ff)).unwrap(), 5);
    driver.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(driver.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    // Queue registers are frozen while the driver is running.
    driver.write(VIRTIO_MMIO_QUEUE_NUM, 8);
    driver.write(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(driver.read(VIRTIO_MMIO_STATUS), 0);
    assert!(!driver.transport.is_activated());
    assert_eq!(
        driver.read(VIRTIO_MMIO_QUEUE_READY),
        0,
        "reset clears the queues"
    );
}

#[test]
fn a_queue_outside_guest_memory_makes_the_device_need_a_reset() {
    let mut driver = Driver::new();
    driver.negotiate(1);
    driver.write(VIRTIO_MMIO_QUEUE_SEL, 0);
    driver.write(VIRTIO_MMIO_QUEUE_NUM, 16);
    driver.write(VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_0000);
    driver.write(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
    driver.write(VIRTIO_MMIO_QUEUE_READY, 1);
    driver.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(!driver.transport.is_activated());
    assert_ne!(driver.read(VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    // The driver learns it through a configuration-change interrupt.
    assert_eq!(driver.irq.read().unwrap(), 1);
    assert_eq!(
        driver.read(VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    // Notifying a device that is not running does nothing.
    driver.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(driver.irq.read().is_err(), "no further interrupt");
}

#[test]
fn a_queue_size_that_is_not_a_power_of_two_is_not_activated() {
    let mut driver = Driver::new();
    let memory = driver.memory.clone();
    let mock = MockSplitQueue::create(&memory, GuestAddress(QUEUE_ADDR), 16);
    driver.negotiate(1);
    driver.set_up_queue(&mock, 13);
    driver.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(!driver.transport.is_activated());
    assert_ne!(driver.read(VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
}

#[test]
fn odd_sized_and_unaligned_register_accesses_are_ignored() {
    let mut driver = Driver::new();
    let mut two = [0xffu8; 2];
    driver.transport.read(BASE, 0, &mut two);
    assert_eq!(two, [0, 0]);
    driver
        .transport
        .write(BASE, u64::from(VIRTIO_MMIO_STATUS), &[1]);
    driver
        .transport
        .write(BASE, u64::from(VIRTIO_MMIO_STATUS) + 1, &1u32.to_le_bytes());
    assert_eq!(driver.read(VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn a_queue_that_only_exists_with_a_feature_may_be_left_unset() {
    let balloon = || {
        Driver::with_device(
            Box::new(Balloon::new(true)),
            tempfile::NamedTempFile::new().unwrap(),
        )
    };
    let activate = |driver: &mut Driver, features_low: u32, queues: u32| {
        let memory = driver.memory.clone();
        driver.negotiate_all(1, features_low);
        assert_ne!(driver.read(VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
        for index in 0..queues {
            let base = GuestAddress(QUEUE_ADDR + u64::from(index) * 0x1000);
            let mock = MockSplitQueue::create(&memory, base, 16);
            driver.set_up_queue_at(index, &mock, 16);
        }
        driver.write(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        driver.transport.is_activated()
    };
    let reporting = 1 << VIRTIO_BALLOON_F_REPORTING;
    assert!(
        activate(&mut balloon(), 0, 2),
        "without free page reporting, inflate and deflate are enough"
    );
    assert!(activate(&mut balloon(), reporting, 3));
    let mut driver = balloon();
    assert!(
        !activate(&mut driver, reporting, 2),
        "with free page reporting the reporting queue is required"
    );
    assert_ne!(driver.read(VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
}
