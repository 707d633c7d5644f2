"""Triton and CPU dequantize-matmul kernels: not built yet, see the quantization issue."""
