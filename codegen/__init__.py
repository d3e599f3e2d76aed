"""Codegen: lowers the optimized IR to generated Triton kernels."""
