"""bench/pipeline: the hand-made stage plans put half the layers on each worker (the chain's, and the GRPO policy's
update after its rollouts and scorers), and the report computes its ratios from the records (speed-ups, the orders'
losses compared) and names the baselines over memory."""

from __future__ import annotations

from bench.pipeline import MEASURED, MEASURED_RL, grpo_stage_plan, report, stage_plan, with_micro_batches, with_order
from planner.spec import load_job


def test_the_stage_plan_cuts_the_chain_in_two_on_the_two_workers():
    job = with_order(load_job(MEASURED), True)
    plan = stage_plan(job)
    assert [[(s.first_layer, s.num_layers, s.devices) for s in w.slices] for w in plan.waves] == [[(0, 4, [0])],
                                                                                                   [(4, 4, [1])]]
    assert plan.pipelined is None and job.training.pipeline_micro_batches is True  # the job says pipelined


def test_the_grpo_plan_runs_the_update_in_two_stages_after_the_rollouts_and_scorers():
    job = with_micro_batches(load_job(MEASURED_RL), 4, True)
    plan = grpo_stage_plan(job)
    uses = [[(plan.metaops[s.metaop].use, s.first_layer, s.num_layers, s.devices) for s in w.slices]
            for w in plan.waves]
    assert uses == [[("rollout", 0, 1, [0, 1])], [("reward", 0, 2, [0]), ("reference", 0, 8, [1])],
                    [("policy", 0, 4, [0])], [("policy", 4, 4, [1])]]
    assert job.training.grad_accum_steps == 4 and job.training.pipeline_micro_batches is True


def planned(order, pipelined, seconds):
    return {"part": "planned", "job": "big", "pipeline_micro_batches": order, "pipelined": pipelined,
            "iteration_s": seconds, "compute_s": seconds, "method": "m", "num_waves": 2, "stage_devices": [32],
            "peak_gib": 60.0, "memory_gib": 80.0, "baselines_s": {"optimus": 7.0, "uniform": 9.0},
            "baselines_fit": {"optimus": False, "uniform": True}, "planning_s": 0.1, "micro_batches": 16}


def measured(plan, seconds, predicted, losses):
    return {"part": "measured", "job": "chain-cpu", "plan": plan, "method": "m", "pipelined": "pipelined" in plan,
            "median_step_s": seconds, "step_s": [seconds], "predicted_s": predicted, "first_losses": losses[0],
            "last_losses": losses[-1], "losses": losses}


def test_the_report_computes_its_ratios_from_the_records():
    same = [{"cls": 1.0}, {"cls": 0.5}]
    records = [planned(False, False, 12.0), planned(True, True, 6.0), planned("auto", True, 6.0),
               measured("planner, in order", 0.5, 0.45, same), measured("planner, auto", 0.4, 0.4, same),
               measured("two stages, in order", 0.8, 0.7, same),
               measured("two stages, pipelined", 0.4, 0.35, [{"cls": 1.0}, {"cls": 0.25}]),
               {"part": "analytic choice", "job": "chain-cpu", "method": "lp", "pipelined": False,
                "predicted_s": 0.9}]
    text = report(records, rounds=3, steps=6)
    assert "Pipelined over in order: **2.00x**" in text
    assert "over device memory: optimus 7.00 s; fitting: uniform 9.00 s" in text
    assert "measured: **2.00x** (predicted 2.00x); losses of every step DIFFERENT between the two orders" in text
    assert "in-order plan: measured 1.25x, predicted 1.12x" in text
    assert "the planner keeps lp (in order, predicted 900.0 ms)" in text
    assert "| auto | pipelined | 6.00 s |" in text and "| false | in order | 12.00 s |" in text
    assert "## Measured: grpo-cpu" not in text  # no GRPO records: no section
    assert "walked 1F1B" not in text  # records before it: no line
    gpipe = measured("two stages, pipelined", 0.4, 0.35, same) | {"micro_batches": 8, "peak_bytes": 6 * 2**20}
    walked = measured("two stages, pipelined 1F1B", 0.38, 0.35, same) | {"micro_batches": 8, "one_f_one_b": True,
                                                                         "peak_bytes": 3 * 2**20}
    text = report([*records[:6], gpipe, walked, records[-1]], rounds=3, steps=6)
    assert "| two stages, pipelined 1F1B | m, pipelined 1F1B | 380.0 ms |" in text
    assert ("GPipe's fill and drain, measured: **1.05x** (predicted 1.00x: the same bubble), losses of every step "
            "identical; the first stage holds 2 of the 8 micro-batches' activations instead of all: predicted peak "
            "3.0 MiB against 6.0 MiB") in text
    assert "Resident memory" not in text  # no memory records: no line
    memory = [{"part": "memory", "job": "chain-cpu", "walk": w, "max_rss_mib": rss, "predicted_peak_mib": peak}
              for w, rss, peak in (("in_order", 490.0, 64.0), ("gpipe", 620.0, 176.0), ("1f1b", 510.0, 80.0))]
    text = report([*records[:6], gpipe, walked, records[-1], *memory], rounds=3, steps=6)
    assert ("in order 490.0 MiB, GPipe 620.0 MiB, 1F1B 510.0 MiB: GPipe holds 110.0 MiB more than 1F1B (predicted "
            "96.0 MiB), 1F1B 20.0 MiB more than in order (predicted 16.0 MiB)") in text


def test_the_grpo_section_compares_one_micro_batch_with_both_orders():
    one = measured("one micro-batch", 3.0, 2.0, [{"grpo": 0.5}, {"grpo": 0.25}])
    in_order = measured("4 micro-batches, in order", 2.4, 1.8, [{"grpo": 0.5}, {"grpo": 0.25000005}])
    piped = measured("4 micro-batches, pipelined", 2.0, 1.6, [{"grpo": 0.5}, {"grpo": 0.25000005}])
    rows = [r | {"part": "measured rl", "job": "grpo-cpu"} for r in (one, in_order, piped)]
    text = report([planned(False, False, 12.0), planned(True, True, 6.0), planned("auto", True, 6.0),
                   measured("planner, in order", 0.5, 0.45, [{"cls": 1.0}]),
                   measured("planner, auto", 0.4, 0.4, [{"cls": 1.0}]),
                   measured("two stages, in order", 0.8, 0.7, [{"cls": 1.0}]),
                   measured("two stages, pipelined", 0.4, 0.35, [{"cls": 1.0}]),
                   {"part": "analytic choice", "job": "chain-cpu", "method": "lp", "pipelined": False,
                    "predicted_s": 0.9}, *rows], rounds=3, steps=6)
    assert "## Measured: grpo-cpu on this machine" in text
    assert "Pipelined over one micro-batch, measured: **1.50x** (predicted 1.25x); over in order 1.20x (predicted " \
           "1.12x)" in text
    assert "identical between the two orders; against one micro-batch within 2.0e-07 relative" in text
