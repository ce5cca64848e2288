"""Loom's orchestrator: the run and the user's entry points.

Owns the `loom` CLI (orchestrator.cli), the Ray cluster connection, worker actors, the driver
loop, failure handling, metrics export and the recipe registry (orchestrator.recipes: the only
code that imports a recipe). May import planner, the runtime API, ray, typer/rich and
prometheus-client; never bench. The CLI only parses, calls one library function and prints.
"""
