# Reset test guest (PVH entry, 32-bit): does what Linux's reboot=k does:
# waits for the i8042 input buffer to drain, then pulses the reset line.
    .code32
    .globl _start
_start:
1:  in $0x64, %al
    test $2, %al
    jnz 1b
    mov $0xfe, %al
    out %al, $0x64
2:  hlt
    jmp 2b
