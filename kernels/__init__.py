"""Kernels for RAT+: each op has a plain PyTorch reference (CPU) and a Triton/Flex path (CUDA).

Installed as ``ratplus_titan.kernels``.
"""
