"""RL-shaped iterations (GRPO, IterComp's feedback step) planned by Loom against verl-style colocated and
OpenRLHF-style split role placements: ``python -m bench.rl``."""
