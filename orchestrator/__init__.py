"""Loom's orchestrator: the run and the user's entry points.

Owns the `loom` CLI (orchestrator.cli), the Ray cluster connection, worker actors, the driver
loop, failure handling and metrics export. May import planner, the runtime API, ray, typer/rich
and prometheus-client. The CLI only parses, calls one library function and prints.
"""
