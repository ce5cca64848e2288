"""Evaluation workloads (YAML job specs) and the synthetic-workload generator; see README.md."""
