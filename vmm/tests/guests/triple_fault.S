# Triple-fault test guest (PVH entry, 32-bit): prints "boom\n" and executes
# UD2. The boot IDT has no gate for #UD, #GP or #DF, so the CPU shuts down.
    .code32
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $'b', %al
    out %al, %dx
    mov $'o', %al
    out %al, %dx
    out %al, %dx
    mov $'m', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    ud2
