"""bench.alignment.grpo_runs: where a loom run's GRPO losses and the one-process run's part."""

from __future__ import annotations

import json

from bench.alignment.grpo_runs import same_until


def write(tmp_path, loom: list[float], one: list[float]):
    (tmp_path / "out/grpo").mkdir(parents=True)
    (tmp_path / "out/grpo/metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": {"grpo": v}}) + "\n" for s, v in enumerate(loom)))
    (tmp_path / "one").mkdir()
    (tmp_path / "one/losses.txt").write_text("".join(f"{v!r}\n" for v in one))
    return tmp_path / "out", tmp_path / "one"


def test_losses_part_at_the_first_step_beyond_the_tolerance(tmp_path):
    # step 0: a loss near 0 differs in its last digits (under the 1e-4 floor); step 2: 1e-6 relative, the float noise
    out, one = write(tmp_path, [3e-8, 3e-4, 1.000001e-2, 2e-2, 5e-3], [-3e-8, 3e-4, 1e-2, 2.1e-2, 5e-3])
    assert same_until(out, one) == 3


def test_equal_losses_run_to_the_end(tmp_path):
    out, one = write(tmp_path, [1e-3, 2e-3], [1e-3, 2e-3])
    assert same_until(out, one) == 2
