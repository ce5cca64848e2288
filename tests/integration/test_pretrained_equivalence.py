"""A pretrained Hugging Face Llama trained by a gloo world under a plan with re-splits equals single-process
training, and equals the transformers model trained by hand on the same batches."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from planner.api import plan_job
from planner.spec import load_job

from _equivalence import STEPS, check_equivalence, check_transformers_losses, plan_from_waves  # tests/integration/_equivalence.py

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
from make_models import save_clip_vision, save_llama  # noqa: E402  (examples/make_models.py)


def test_pretrained_llama_across_resplit_waves_equals_the_transformers_model(tmp_path):
    save_llama(tmp_path / "llama")
    spec = {
        "name": "hf-llama", "cluster": {"num_nodes": 1, "devices_per_node": 4, "device": "cpu"},
        "components": {"lm": {"pretrained": "llama", "seq_len": 12}},
        "tasks": [{"name": "caption", "batch_size": 8, "loss": "lm", "components": [{"component": "lm"}]}],
        "training": {"steps": STEPS, "lr": 1e-3, "precision": "fp32"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(tmp_path / "job.yaml")
    # the 4 layers: 1 on devices {0, 1}, 2 re-split over all 4, the last back on 2 (rows change owners twice)
    plan = plan_from_waves(job, [[("caption.lm", 1, 2)], [("caption.lm", 2, 4)], [("caption.lm", 1, 2)]])
    world = check_equivalence(job, plan, tmp_path / "world")  # the world equals Loom's single-process training
    check_transformers_losses(job, tmp_path / "llama", world)  # ... and the transformers model trained by hand


def test_clip_tower_feeding_a_pretrained_llama_equals_single_process(tmp_path):
    """LLaVA's shape on 2 gloo workers under the planner's own plan: CLIP's tokens projected into the Llama, followed by
    text; a second task reads the Llama alone (shared layers, two connections)."""
    save_llama(tmp_path / "llama")
    save_clip_vision(tmp_path / "clip")
    spec = {
        "name": "hf-vlm", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"vision": {"pretrained": "clip"}, "lm": {"pretrained": "llama", "seq_len": 25}},
        "tasks": [
            {"name": "caption", "batch_size": 8, "loss": "lm", "components": [{"component": "vision"}, {"component": "lm"}]},
            {"name": "chat", "batch_size": 4, "loss": "lm", "components": [{"component": "lm", "seq_len": 8}]},
        ],
        # AdamW moves an element whose gradient is a near-zero cancelling sum by about lr whatever its sign, so
        # float-level differences in such gradients (here: rarely seen token rows of the embedding) become
        # parameter differences of order lr; at 1e-3 they reach 2e-5 of the small embedding table's norm
        "training": {"steps": STEPS, "lr": 1e-4, "precision": "fp32"},
        "planner": {"time_limit_s": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(tmp_path / "job.yaml")
    check_equivalence(job, plan_job(job, with_baselines=False).plan, tmp_path / "world")


def test_loom_run_exports_the_trained_model_as_a_from_pretrained_folder(tmp_path):
    """The driver end to end (embedded Ray, 2 workers): OUT/export/lm loads with from_pretrained and holds exactly
    the parameters the workers trained, under the checkpoint's own names."""
    from transformers import AutoModelForCausalLM

    from orchestrator.run import RunOptions, run_job
    from runtime.export import component_tensors
    from runtime.reference import merge_parameters

    save_llama(tmp_path / "llama")
    spec = {
        "name": "hf-export", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"lm": {"pretrained": "llama", "seq_len": 12}},
        "tasks": [{"name": "caption", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}],
        "training": {"steps": 2, "lr": 1e-3, "precision": "fp32"},
        "planner": {"time_limit_s": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    job = load_job(tmp_path / "job.yaml")
    result = run_job(job, options=RunOptions(out_dir=tmp_path / "out", collect_parameters=True))
    trained = component_tensors(job, "lm", merge_parameters(list(result.parameters.values())))
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "export" / "lm").named_parameters())
    assert set(exported) == set(trained)
    for name, tensor in exported.items():
        assert torch.equal(tensor.detach(), trained[name]), name
    source = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "llama").named_parameters())
    assert not torch.equal(source["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])
