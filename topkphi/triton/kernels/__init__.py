"""Triton kernels; each file imports only ``triton`` and ``triton.language``."""
