"""Planner benchmark suite: plan quality and planning time on Spindle's evaluation grid, a sweep and at scale.

Run ``python -m bench.planner [--quick] [--section grid|sweep|scale|recipe] [--only CELL] [--repeats 3]``.
For every cell (a workload on N devices) it plans with :func:`planner.api.plan_job`, records Loom's
predicted iteration time against every baseline and the relaxed bounds (full and compute-only), the solver's status and
gap, and the median planning time, then writes ``bench/results/planner.{json,md}`` with a
"Targets" section that says PASS or SHORT for each target of the planner issue.

The scale section plans each cell in a fresh process (its peak RSS), baselines included in the planning
time, and checks the issue-13 targets (best fitting baseline, 1.3x geometric mean, planning time and memory).

Modules: ``cells`` (which cells exist and the job of each), ``measure`` (one cell -> one record),
``report`` (markdown tables and target verdicts).
"""
