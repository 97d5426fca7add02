"""Triton kernels of cbtm (installed as cbtm.kernels)."""
