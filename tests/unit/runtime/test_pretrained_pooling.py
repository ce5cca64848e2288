"""A pretrained tower's head pools as its transformers model does (pooler_output): CLIP's class token through
post_layernorm and its end-of-text token, SigLIP's attention-pooling head and last-token head, BERT's pooler; one
training step equals the transformers model's own pooler_output feeding Loom's classifier (every tensor's gradient,
the pooler's included) and the export carries the trained pooler. `pooling: mean` keeps the head's mean pooling, and
a bad `pooling:` is one error line."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from planner.spec import load_job
from runtime.data import synthetic_batch
from runtime.export import component_tensors, export_pretrained
from runtime.reference import ReferenceTrainer

sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
from make_models import (  # noqa: E402  (examples/make_models.py)
    save_bert, save_clip_vision, save_llama, save_siglip_vision, save_text_tower)

RTOL = 1e-5
TOWERS = {"clip": "CLIPVisionModel", "clip_text": "CLIPTextModel", "siglip": "SiglipVisionModel",
          "siglip_text": "SiglipTextModel", "bert": "BertModel"}
IMAGES = ("clip", "siglip")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool_models")
    save_clip_vision(root / "clip")
    save_siglip_vision(root / "siglip")
    save_text_tower(root / "clip_text", "clip")
    save_text_tower(root / "siglip_text", "siglip", projection_size=24)  # its head projects 32 -> 24
    save_bert(root / "bert")
    save_llama(root / "llama")
    return root


def write_job(folder: Path, tower: str, loss: str = "cross_entropy", **task) -> Path:
    comp = {"pretrained": str(folder / tower)} | ({} if tower in IMAGES else {"seq_len": 12})
    doc = {"name": "pool", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
           "components": {"enc": comp},
           "tasks": [{"name": "classify", "batch_size": 4, "loss": loss, "components": [{"component": "enc"}]} | task],
           "training": {"steps": 1, "lr": 1e-3, "precision": "fp32"}}
    path = folder / f"job-{tower}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _hf(models: Path, tower: str, folder: Path | None = None):
    import transformers

    return getattr(transformers, TOWERS[tower]).from_pretrained(folder or models / tower).eval()


def _run(model, tower: str, x: torch.Tensor):
    return model(pixel_values=x) if tower in IMAGES else model(input_ids=x)


def _with_end_of_text(ids: torch.Tensor) -> torch.Tensor:
    """Rows whose end-of-text token (1, also the pad id) sits at different positions, then pads."""
    ids = ids.clone()
    for row, at in enumerate((3, 7, 11, 5)):
        ids[row, ids[row] == 1] = 2
        ids[row, at:] = 1
    return ids


@pytest.mark.parametrize("tower", TOWERS)
def test_the_head_pools_as_the_transformers_model_and_trains_and_exports_its_pooler(models, tower, tmp_path):
    job = load_job(write_job(models, tower))
    reference = ReferenceTrainer(job)
    head = reference.head(0)
    assert "0" in head.poolers and head.norm is None  # the model's pooling, not the head's LayerNorm and a mean
    batch = synthetic_batch(job, 0, 0, 0, 4)
    if tower == "clip_text":
        batch.inputs["enc"] = _with_end_of_text(batch.inputs["enc"])
    x = batch.inputs["enc"]
    model = _hf(models, tower)
    with torch.no_grad():
        want = _run(model, tower, x).pooler_output
        (got,) = head.pooled(reference.forward(0, batch), batch)
    assert got.shape == want.shape and float((got - want).norm() / want.norm()) <= RTOL, tower
    # one step: the library model's own pooler_output into a copy of Loom's classifier, every gradient equal
    classifier = copy.deepcopy(head.out)
    pooled = _run(model, tower, synthetic_batch(job, 0, 0, 0, 4).inputs["enc"]).pooler_output
    want_loss = torch.nn.functional.cross_entropy(classifier(pooled), synthetic_batch(job, 0, 0, 0, 4).labels)
    want_loss.backward()
    got_loss = reference.train_step(0, keep_gradients=True)["classify"]
    want_loss = float(want_loss.detach())
    assert abs(got_loss - want_loss) <= RTOL * want_loss, (got_loss, want_loss)
    ours = component_tensors(job, "enc", reference.last_gradients)
    trained = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    pooler_names = [n for n in trained if n.startswith(("post_layernorm", "head.", "pooler."))]
    assert bool(pooler_names) == (tower != "clip_text"), sorted(trained)
    for name, g in trained.items():
        assert float((ours[name] - g).norm() / g.norm().clamp(min=1e-12)) <= RTOL, name
    # the export holds the trained pooler: the library's pooler_output equals Loom's after the step
    (folder,) = export_pretrained(job, reference.named_parameters(), tmp_path / "export")
    with torch.no_grad():
        exported = _run(_hf(models, tower, folder), tower, x).pooler_output
        (got,) = head.pooled(reference.forward(0, batch), batch)
    assert float((got - exported).norm() / exported.norm()) <= RTOL
    assert float((exported - want).norm()) > 0  # it trained


def test_pooling_mean_keeps_the_heads_layernorm_and_mean(models):
    job = load_job(write_job(models, "clip", pooling="mean"))
    reference = ReferenceTrainer(job)
    head = reference.head(0)
    assert not head.poolers and head.norm is not None
    batch = synthetic_batch(job, 0, 0, 0, 4)
    with torch.no_grad():
        outputs = reference.forward(0, batch)
        (got,) = head.pooled(outputs, batch)
        assert torch.allclose(got, head.norm(outputs["enc"]).mean(dim=1))


def test_a_contrastive_pair_of_towers_pools_each_with_its_own_model(models, tmp_path):
    """CLIP's shape: an image tower and a text tower of another width (SigLIP text's 24-wide head output, projected
    to the narrower by the head), each pooled by its own model."""
    doc = yaml.safe_load(write_job(models, "clip", loss="infonce").read_text())
    doc["components"]["text"] = {"pretrained": str(models / "siglip_text"), "seq_len": 12}
    doc["tasks"][0]["components"].append({"component": "text", "after": []})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    job = load_job(tmp_path / "job.yaml")
    reference = ReferenceTrainer(job)
    head = reference.head(0)
    assert sorted(head.poolers) == ["0", "1"] and list(head.project) == ["0"]  # 32 -> 24
    first = reference.train_step(0)["classify"]
    assert first == ReferenceTrainer(job).train_step(0)["classify"]


@pytest.mark.parametrize("task, expected", [
    ({"pooling": "cls"}, "tasks[0].pooling ('cls'): input should be 'model' or 'mean'"),
    ({"pooling": "model", "loss": "lm"}, "tasks[0] ('classify').pooling ('model') applies to the pooled losses"),
    ({"pooling": "model", "llama": True}, "leaf 'enc' runs components.enc, whose model has no pooled output"),
], ids=["bad-value", "not-a-pooled-loss", "no-pooler"])
def test_a_bad_pooling_is_one_error_line(models, tmp_path, task, expected):
    tower = "llama" if task.pop("llama", False) else "clip_text"
    loss = task.pop("loss", "cross_entropy")
    doc = yaml.safe_load(write_job(models, tower, loss=loss, **task).read_text())
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    # a value pydantic refuses stops `loom validate`; a pooling the task cannot have stops `loom run` before it starts
    command = ["validate"] if "'cls'" in expected else ["run", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*command, str(tmp_path / "job.yaml")])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
