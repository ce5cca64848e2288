"""``components.<name>.init_from``: a Loom-kind component starts from a run's model file (runtime.init_from), read
relative to the spec's folder or from a phase's ``@<phase>/checkpoint``; what does not fit is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from planner.errors import SpecError
from planner.pipeline import resolve_references
from planner.spec import parse_job
from recipes.diffusion.models import save_towers
from runtime.checks import check_trainable
from runtime.reference import ReferenceTrainer, save_model

ENCODER = {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 4}


def job(encoder=None, base=None, name="j"):
    return parse_job({"name": name, "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
                      "components": {"encoder": {**ENCODER, **(encoder or {})}},
                      "tasks": [{"name": "cls", "batch_size": 2, "components": [{"component": "encoder"}]}],
                      "training": {"steps": 1, "precision": "fp32", "lr": 1e-2}}, base=base)


@pytest.fixture
def trained(tmp_path):
    """A run's model file (one step away from the seeded initialisation) in OUT/<phase>/model.pt."""
    trainer = ReferenceTrainer(job())
    trainer.train_step(0)
    (tmp_path / "rm" / "ckpt" / "step_1").mkdir(parents=True)
    save_model(tmp_path / "rm" / "model.pt", [trainer.named_parameters()])
    return tmp_path, trainer.named_parameters()


def test_a_component_starts_from_the_model_file(trained):
    folder, params = trained
    fresh = ReferenceTrainer(job(name="other")).named_parameters()  # another seed would not matter: same names
    started = ReferenceTrainer(job({"init_from": "rm/ckpt/step_1"}, base=folder)).named_parameters()
    mine = {k for k in params if k.startswith(("encoder/", "embed:encoder/"))}
    assert mine and all(torch.equal(started[k], params[k]) for k in mine)
    assert not all(torch.equal(fresh[k], params[k]) for k in mine)  # the file is not the seeded initialisation
    assert all(torch.equal(started[k], fresh[k]) for k in started if k not in mine)  # the head is its own


def test_a_phase_reference_becomes_the_checkpoint_folder(tmp_path):
    doc = {"components": {"encoder": {**ENCODER, "init_from": "@rm/checkpoint"}}}
    locate = lambda ref, sub: tmp_path / ref.phase / "ckpt" / "step_1"  # noqa: E731
    resolved = resolve_references(doc, locate, {"name": "p"})
    assert resolved["components"]["encoder"]["init_from"] == str((tmp_path / "rm" / "ckpt" / "step_1").resolve())
    planned = resolve_references(doc, None, {"name": "p"})  # planning: where the artifact will be
    assert planned["components"]["encoder"]["init_from"].endswith(str(Path("out/p/rm/ckpt")))


def test_what_does_not_fit_is_one_line(trained, tmp_path):
    folder, _ = trained
    with pytest.raises(ValueError, match=re.escape("components.encoder.init_from: ")) as err:
        check_trainable(job({"init_from": str(tmp_path / "none")}))
    assert "no model.pt there or up to two folders above" in str(err.value) and "\n" not in str(err.value)
    save_model(tmp_path / "narrow.pt", [ReferenceTrainer(job({"hidden_size": 8})).named_parameters()])
    with pytest.raises(ValueError, match=re.escape("components.encoder.init_from (")) as err:
        ReferenceTrainer(job({"init_from": str(tmp_path / "narrow.pt")}))
    assert "of shape" in str(err.value) and "\n" not in str(err.value)
    vision, _ = save_towers(tmp_path / "towers")  # a CLIP vision tower (the diffusion recipe's, random weights)
    with pytest.raises(SpecError, match="init_from .* is for Loom's own kinds"):
        parse_job({"name": "j", "components": {"v": {"pretrained": str(vision), "init_from": "x.pt"}},
                   "tasks": [{"name": "t", "batch_size": 1, "components": [{"component": "v"}]}]})


def test_a_phase_whose_component_starts_from_an_earlier_phase_passes_loom_runs_checks(tmp_path):
    """`loom run` checks every trained phase before anything runs; a phase whose component's init_from names an
    earlier phase's checkpoint is checked when it starts (the file does not exist before), as a phase reading an
    earlier phase's data is."""
    import yaml

    from orchestrator.pipeline import PipelineRunner, read_pipeline
    from orchestrator.run import RunOptions

    task = {"name": "cls", "batch_size": 2, "components": [{"component": "encoder"}]}
    doc = {"name": "two", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
           "components": {"encoder": ENCODER}, "training": {"steps": 1, "precision": "fp32", "checkpoint_every": 1},
           "phases": [{"name": "first", "tasks": [task]},
                      {"name": "second", "components": {"encoder": {"init_from": "@first/checkpoint"}},
                       "tasks": [task]}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    pipeline = read_pipeline(tmp_path / "job.yaml")
    PipelineRunner(pipeline, RunOptions(out_dir=tmp_path / "out")).check()  # no error: nothing exists yet
    second = pipeline.phases[1].job
    assert second.components["encoder"].init_from.endswith(str(Path("out/two/first/ckpt")))
