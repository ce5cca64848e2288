"""``python -m orchestrator`` runs the ``loom`` command line."""

from orchestrator.cli import main

main()
