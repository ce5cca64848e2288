"""python -m bench.transfer: gloo point-to-point vs Ray object store for one activation piece."""
