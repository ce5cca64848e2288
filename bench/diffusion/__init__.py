"""Benchmarks of recipe ``diffusion`` (IterComp): ``python -m bench.diffusion.itercomp``."""
