"""Weight quantization: round-to-nearest and GPTQ int2/3/4/8 weights for linear layers.

Packs weights, scales and zeros as graph tensors behind the `quant.linear` op. May import ir/,
passes/ and runtime/reference (GPTQ's calibration runs through the reference executor); its
Triton kernels live in codegen/triton/kernels/.
"""
