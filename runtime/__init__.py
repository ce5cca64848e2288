"""Loom's runtime: what happens on one device.

Owns process groups built from a plan, MetaOp slice execution, inter-wave transfers,
shared-parameter gradient sync, the optimizer, checkpoint shards and the stage backends
(megatron-core, torch, diffusers). May import planner types, kernels, torch and backends (lazily);
never ray or pulp. Not built yet: see the runtime issue.
"""
