// cuemu's fiber switch (x86-64 System V): the only out-of-line part of the emulator.
//
//   void cuemu_switch(void** save, void* load)
//
// Pushes the callee-saved registers (rbp rbx r12-r15) and the floating-point control state (MXCSR,
// x87 control word) on the current stack, stores the stack pointer in *save, switches to the stack
// `load` and pops the same state from it; `ret` then resumes whatever parked there (or, on a fresh
// fiber stack, enters fiber_main: see cuemu::fiber_stack). Caller-saved registers need no saving:
// to the compiler this is an ordinary call.
asm(R"(
    .text
    .globl cuemu_switch
    .type cuemu_switch, @function
cuemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch, .-cuemu_switch
    .section .note.GNU-stack,"",@progbits
)");
