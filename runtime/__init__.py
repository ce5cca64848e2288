"""Loom's runtime: what happens on one device.

Owns the torch modules built from a job spec (modules.py), synthetic data (data.py), the plan's
data movement as pure data (assignment.py), the wave executor (executor.py: forward wave by wave,
inter-wave transfers, backward, shared-parameter gradient sync, AdamW), the megatron-core backend
(megatron_compat.py, megatron_backend.py), the single-process reference (reference.py) and the
layer profiler (profiler.py). May import planner types, torch and megatron-core (lazily); never
ray, pulp, the orchestrator, bench, or a recipe (recipes register into runtime's registries when
the orchestrator loads them; tests/unit/test_import_rules.py enforces all of it). Entry point:
:class:`runtime.executor.WaveWorker`, built from its rank's :class:`runtime.payload.WorkerPayload` (the Assignment and
the specs it builds and runs, never the whole job; runtime.prepare builds them in the driver). See docs/runtime.md.
"""
