"""Loom's planner: job specs, MetaGraph, cost models, bounds, schedulers, placement, simulator, Plan.

Owns everything that decides *how* a job is laid out on devices. Pure: imports only the stdlib,
numpy, pydantic, pyyaml and pulp/highspy; never torch or ray, nor runtime, orchestrator, recipes,
kernels or bench (tests/unit/test_import_rules.py enforces it).
Entry point: :func:`planner.api.plan_job` (spec in, :class:`planner.plan.Plan` out); for batches whose shapes
vary, :func:`planner.plan_cache.plan_cache` (spec and shapes file in, :class:`planner.plan_cache.PlanSet` out).
"""
