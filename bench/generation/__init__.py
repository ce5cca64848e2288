"""Generation priced by the analytic model against `loom profile`'s measurement on this machine:
``python -m bench.generation``."""
