"""Plain-torch reference kernels, one module per concept (ops.py picks them or their GPU
twins). Kept free of torch imports: the profile analysis reads KERNEL_RANGE without it."""

# While a torch profiler records, ops.py runs each reference inside a range of this prefix
# and the kernel's name ("coserve.kernel.fused_moe"): a CPU profile's top-level "kernel" is
# then the reference, classed as its GPU twin is, not the aten ops it is made of.
KERNEL_RANGE = "coserve.kernel."
