# virtio-blk test guest (PVH entry, 32-bit, paging off): a minimal
# virtio-mmio driver for the device at 0xd0000000. It negotiates
# VIRTIO_F_VERSION_1, sets up queue 0 (8 entries at 0x30000), reads sector 1,
# prints its first 8 bytes, writes the same data to sector 2, and exits with
# status 0. The device serves requests during the QueueNotify write, so the
# used ring is complete when the write returns; no interrupt handler needed.
# Failure statuses: 3 not a virtio-blk device, 6 FEATURES_OK refused,
# 7 read not returned, 8 read failed, 9 no used-buffer interrupt status,
# 10 write not returned, 11 write failed.
    .code32
    .globl _start
    .set MMIO, 0xd0000000
    .set DESC, 0x30000
    .set AVAIL, 0x30100
    .set USED, 0x30200
    .set HEADER, 0x31000
    .set DATA, 0x32000
    .set STATUS, 0x33000
_start:
    mov $MMIO, %ebx
    mov $3, %al
    cmpl $0x74726976, 0x000(%ebx)       # magic "virt"
    jne exit
    cmpl $2, 0x008(%ebx)                # device ID: block
    jne exit
    movl $0, 0x070(%ebx)                # status: reset
    movl $1, 0x070(%ebx)                # ACKNOWLEDGE
    movl $3, 0x070(%ebx)                # DRIVER
    movl $1, 0x024(%ebx)                # driver features, high word
    movl $1, 0x020(%ebx)                # VIRTIO_F_VERSION_1
    movl $0, 0x024(%ebx)
    movl $0, 0x020(%ebx)
    movl $0xb, 0x070(%ebx)              # FEATURES_OK
    mov $6, %al
    testl $8, 0x070(%ebx)
    jz exit
    movl $0, 0x030(%ebx)                # queue 0
    movl $8, 0x038(%ebx)                # 8 entries
    movl $DESC, 0x080(%ebx)
    movl $0, 0x084(%ebx)
    movl $AVAIL, 0x090(%ebx)
    movl $0, 0x094(%ebx)
    movl $USED, 0x0a0(%ebx)
    movl $0, 0x0a4(%ebx)
    movl $1, 0x044(%ebx)                # queue ready
    movl $0xf, 0x070(%ebx)              # DRIVER_OK

    # Descriptors: 0 header -> 1 data -> 2 status.
    movl $HEADER, DESC + 0x00
    movl $0, DESC + 0x04
    movl $16, DESC + 0x08
    movw $1, DESC + 0x0c                # NEXT
    movw $1, DESC + 0x0e
    movl $DATA, DESC + 0x10
    movl $0, DESC + 0x14
    movl $512, DESC + 0x18
    movw $3, DESC + 0x1c                # NEXT | WRITE
    movw $2, DESC + 0x1e
    movl $STATUS, DESC + 0x20
    movl $0, DESC + 0x24
    movl $1, DESC + 0x28
    movw $2, DESC + 0x2c                # WRITE
    movw $0, DESC + 0x2e

    # Read sector 1.
    movl $0, HEADER + 0                 # VIRTIO_BLK_T_IN
    movl $0, HEADER + 4
    movl $1, HEADER + 8
    movl $0, HEADER + 12
    movb $0xff, STATUS
    movw $0, AVAIL + 0                  # flags
    movw $0, AVAIL + 4                  # ring[0] = descriptor 0
    movw $1, AVAIL + 2                  # idx
    movl $0, 0x050(%ebx)                # notify queue 0
    mov $7, %al
    cmpw $1, USED + 2
    jne exit
    mov $8, %al
    cmpb $0, STATUS
    jne exit
    mov $DATA, %esi
    mov $8, %ecx
    mov $0x3f8, %dx
1:  lodsb
    out %al, %dx
    loop 1b
    mov $'\n', %al
    out %al, %dx
    mov $9, %al
    cmpl $1, 0x060(%ebx)                # InterruptStatus: used buffer
    jne exit
    movl $1, 0x064(%ebx)                # InterruptACK

    # Write the data to sector 2: the data buffer is now device-readable.
    movl $1, HEADER + 0                 # VIRTIO_BLK_T_OUT
    movl $2, HEADER + 8
    movw $1, DESC + 0x1c                # NEXT only
    movb $0xff, STATUS
    movw $0, AVAIL + 6                  # ring[1] = descriptor 0
    movw $2, AVAIL + 2
    movl $0, 0x050(%ebx)
    mov $10, %al
    cmpw $2, USED + 2
    jne exit
    mov $11, %al
    cmpb $0, STATUS
    jne exit
    xor %al, %al
exit:
    mov $0x501, %dx
    out %al, %dx
hang:
    hlt
    jmp hang
