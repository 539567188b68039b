# 64-bit boot-protocol test guest (long mode, position independent: the
# same bytes serve as an ELF vmlinux without PVH note and as the 64-bit
# entry of a bzImage). Checks boot_params (HdrS magic), prints
# "LM64 <cmdline>\n", writes 0x1234abcd to the MMIO test device at
# 0xd0000000, reads it back, prints "MMIO OK\n" and exits with status 0
# (3: bad boot_params, 4: MMIO value mismatch).
    .code64
    .globl _start
_start:
    mov %rsi, %rbp                  # boot_params
    cmpl $0x53726448, 0x202(%rbp)   # hdr.header == "HdrS"
    jne bad_params
    lea msg(%rip), %rsi
    call puts
    mov 0x228(%rbp), %esi           # hdr.cmd_line_ptr
    call puts
    mov $'\n', %al
    out %al, %dx
    mov $0xd0000000, %ebx
    movl $0x1234abcd, (%rbx)
    mov (%rbx), %eax
    cmp $0x1234abcd, %eax
    jne bad_mmio
    lea mmio_ok(%rip), %rsi
    call puts
    xor %al, %al
exit:
    mov $0x501, %dx
    out %al, %dx
hang:
    hlt
    jmp hang
bad_params:
    mov $3, %al
    jmp exit
bad_mmio:
    mov $4, %al
    jmp exit
puts:                               # %rsi: NUL-terminated string
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret
msg:
    .asciz "LM64 "
mmio_ok:
    .asciz "MMIO OK\n"
