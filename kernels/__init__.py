"""gptfast.kernels: fused Triton kernels, one file per op (kernel + launcher + autograd Function)."""
