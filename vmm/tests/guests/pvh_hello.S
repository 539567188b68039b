# PVH test guest (32-bit protected mode, paging off, linked at 0x100000).
# Checks the hvm_start_info magic, prints "PVH <cmdline>\n", then the
# contents of the first module (the initrd) if there is one, and exits
# through the debug-exit port with status 0 (3 if the magic is wrong).
    .code32
    .globl _start
_start:
    mov $0x8ff0, %esp
    mov %ebx, %ebp                  # hvm_start_info
    cmpl $0x336ec578, (%ebp)
    jne bad_magic
    mov $msg, %esi
    call puts
    mov 24(%ebp), %esi              # cmdline_paddr
    call puts
    mov $0x3f8, %dx
    mov $'\n', %al
    out %al, %dx
    cmpl $0, 12(%ebp)               # nr_modules
    je done
    mov 16(%ebp), %edi              # modlist_paddr
    mov (%edi), %esi                # module paddr
    mov 8(%edi), %ecx               # module size
1:  lodsb
    out %al, %dx
    loop 1b
done:
    xor %al, %al
exit:
    mov $0x501, %dx
    out %al, %dx
hang:
    hlt
    jmp hang
bad_magic:
    mov $3, %al
    jmp exit
puts:                               # %esi: NUL-terminated string
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret
msg:
    .asciz "PVH "
