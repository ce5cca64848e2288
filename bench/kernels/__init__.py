"""python -m bench.kernels: each kernel of kernels/ against the naive torch expression (memory, time, gradients)."""
