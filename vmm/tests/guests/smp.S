# SMP test guest (PVH entry, 32-bit, linked at 0x100000). The boot CPU
# prints "cpu<APIC ID>\n" (from CPUID leaf 1), copies a real-mode
# trampoline to 0x10000 and starts the other CPUs with INIT + SIPI through
# its LAPIC. Each AP prints its own line under a spinlock and counts itself
# in; the boot CPU waits (bounded) for all of them and exits with status 0
# (5 if an AP did not arrive).
    .code32
    .globl _start
_start:
    mov $0x8ff0, %esp
    mov $trampoline, %esi
    mov $0x10000, %edi
    mov $(trampoline_end - trampoline), %ecx
    rep movsb
    movl $0, 0x11000                # APs arrived
    movl $0, 0x11004                # print lock
    mov $1, %eax
    cpuid
    mov %ebx, %edi
    shr $16, %edi
    and $0xff, %edi                 # logical processor count
    dec %edi                        # APs to wait for
    shr $24, %ebx
    call print_cpu
    movl $0x000c4500, 0xfee00300    # INIT, all excluding self
    movl $0x000c4610, 0xfee00300    # SIPI, vector 0x10 -> 0x10000
    mov $50000000, %ecx
wait:
    cmp %edi, 0x11000
    je all_in
    pause
    loop wait
    mov $5, %al
    jmp exit
all_in:
    xor %al, %al
exit:
    mov $0x501, %dx
    out %al, %dx
hang:
    hlt
    jmp hang
print_cpu:                          # %bl: APIC ID
    mov $0x3f8, %dx
    mov $'c', %al
    out %al, %dx
    mov $'p', %al
    out %al, %dx
    mov $'u', %al
    out %al, %dx
    mov %bl, %al
    add $'0', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    ret

    .code16
trampoline:                         # runs at 0x10000 in real mode
    cli
    mov $0x1000, %ax
    mov %ax, %ds                    # ds:0x1000 = 0x11000
1:  mov $1, %al
    xchg %al, 0x1004
    test %al, %al
    jz 2f
    pause
    jmp 1b
2:  mov $1, %eax
    cpuid
    shr $24, %ebx
    mov $0x3f8, %dx
    mov $'c', %al
    out %al, %dx
    mov $'p', %al
    out %al, %dx
    mov $'u', %al
    out %al, %dx
    mov %bl, %al
    add $'0', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    movb $0, 0x1004
    lock incl 0x1000
3:  cli
    hlt
    jmp 3b
trampoline_end:
