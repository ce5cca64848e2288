"""The end-of-run summary ``loom run`` prints: losses at the start vs the end per task, measured vs predicted step
time, where the outputs are."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.run import STEP_LOG_FILE

if TYPE_CHECKING:
    from orchestrator.run import RunResult


def summary_lines(result: RunResult) -> list[str]:
    """The end-of-run summary: losses at the start vs the end per task, measured vs predicted step time."""
    records = result.records
    if not records:
        return [f"{result.job}: nothing to train: already at step {result.last_step}, and the run was asked for "
                f"{result.num_steps} steps (--steps)."]
    window = max(1, len(records) // 10)
    head, tail = records[:window], records[-window:]
    lines = [
        f"{result.job}: trained steps {result.first_step}..{result.last_step - 1} on "
        f"{result.plan.cluster.num_nodes * result.plan.cluster.devices_per_node} workers (plan {result.plan.hash})"
        + (f", resumed from step {result.first_step}" if result.resumed_from else ""),
        f"loss per task, mean of the first {window} vs the last {window} step(s):",
    ]
    width = max(len(task) for task in records[0].loss)
    for task in records[0].loss:
        first = sum(r.loss[task] for r in head) / window
        last = sum(r.loss[task] for r in tail) / window
        change = f"{(last - first) / abs(first) * 100:+.0f}%" if first else "-"
        lines.append(f"  {task:<{width}}  {first:.4f} -> {last:.4f}  ({change})")
    mean, predicted = result.mean_step_seconds(), result.plan.predicted.iteration_time_s
    ratio = f" ({mean / predicted:.1f}x the prediction)" if predicted > 0 else ""
    lines.append(f"step time: {mean:.3f} s measured (mean after the first step), {predicted:.4f} s predicted{ratio}")
    timed = [r for r in (records[1:] if len(records) > 1 else records) if r.wave_seconds]
    if timed and timed[0].predicted_wave_seconds:
        pairs = zip(zip(*(r.wave_seconds for r in timed)), timed[0].predicted_wave_seconds)
        lines.append("wave compute, measured (slowest worker, mean) / predicted: " + ", ".join(
            f"{k}: {sum(m) / len(m) * 1e3:.3g}/{want * 1e3:.3g} ms" for k, (m, want) in enumerate(pairs)))
    lines.append(f"outputs: {result.out_dir / STEP_LOG_FILE}"
                 + (f", checkpoint {result.checkpoints[-1].path}" if result.checkpoints else ""))
    return lines
