"""Loom's fused kernels, each with a plain-torch reference twin (Triton on GPU, guarded import).

May import torch and triton. Nothing here yet: kernels arrive with the runtime.
"""
