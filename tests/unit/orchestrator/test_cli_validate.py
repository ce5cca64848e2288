"""`loom validate` says what `loom run` would refuse (runtime.checks.check_trainable, torch-free), with the same
reason `loom run` prints, and keeps a spec that plans valid (exit code 0: planning-only specs name losses the
runtime does not run)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

TRAINABLE = {
    "name": "v",
    "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
    "components": {
        "img": {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 8, "image_size": 32},
        "txt": {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 17},
        "pool": {"kind": "mlp", "num_layers": 1, "hidden_size": 32},
    },
    "tasks": [{"name": "caption", "batch_size": 2, "loss": "cross_entropy",
               "components": [{"component": "img"}, {"component": "txt"}]}],
    "training": {"steps": 1, "precision": "fp32"},
}


def _unknown_loss(doc: dict) -> None:
    doc["tasks"][0]["loss"] = "dpo"


def _longer_than_its_input(doc: dict) -> None:  # an mlp use declared with 40 positions reads the ViT's 17
    doc["tasks"][0]["components"][1] = {"component": "pool", "seq_len": 40}


def _one_leaf_contrastive(doc: dict) -> None:
    doc["tasks"][0]["loss"] = "contrastive"


def _samples_into_text(doc: dict) -> None:  # a pixel-space UNet's samples piped into a text transformer
    doc["components"]["unet"] = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "channel_mults": [1, 2],
                                 "in_channels": 3, "image_size": 8}
    doc["tasks"][0]["components"] = [
        {"component": "unet", "mode": "sample", "denoise_steps": 2, "grad_last_step": True},
        {"component": "txt", "mode": "forward"}]


@pytest.mark.parametrize("mutate, reason", [
    # the supported losses that follow depend on which recipes this test process has loaded (their losses register
    # process-wide), so only the reason itself is compared
    (_unknown_loss, "tasks[0] ('caption').loss ('dpo') is not run by the runtime; supported:"),
    (_longer_than_its_input, "tasks[0].components[1] ('pool') reads 'img' (17 x 32), 17 positions, but is declared "
                             "with 40; only a transformer or llama use adds its own text tokens"),
    (_one_leaf_contrastive, "tasks[0] ('caption').loss ('contrastive') needs exactly two leaf uses"),
    (_samples_into_text, "tasks[0].components[1] ('txt') reads the samples of sample use 'unet' (3 x 8 x 8 images); "
                         "component 'txt' (kind 'transformer') does not embed images"),
], ids=["unknown-loss", "use-longer-than-input", "contrastive-one-leaf", "samples-into-text"])
def test_validate_says_what_run_refuses(tmp_path: Path, mutate, reason: str) -> None:
    doc = copy.deepcopy(TRAINABLE)
    mutate(doc)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    runner = CliRunner()
    validated = runner.invoke(app, ["validate", str(job)])
    assert validated.exit_code == 0, validated.output
    valid, note = validated.stdout.splitlines()
    assert valid.startswith(f"{job}: valid.")
    assert note.startswith(f"note: `loom run` would refuse it: {reason}"), note
    refused = runner.invoke(app, ["run", str(job), "--out", str(tmp_path / "out")])
    assert refused.exit_code == 2, refused.output
    error = refused.stderr.strip()
    assert error.startswith(f"error: {reason}"), error
    said = note.removeprefix("note: `loom run` would refuse it: ").split("; supported:")[0]
    assert said.startswith(error.removeprefix("error: ").split("; supported:")[0])
    assert not (tmp_path / "out").exists()


def test_a_trainable_job_validates_in_one_line(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(TRAINABLE))
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 0 and result.stderr == ""
    assert len(result.stdout.splitlines()) == 1 and "valid." in result.stdout


def test_validate_plan_and_run_refuse_a_data_dir_without_a_recipe(tmp_path: Path) -> None:
    """Only a recipe's dataset reads data_dir: without `recipe:` an existing folder validated and was ignored."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**TRAINABLE, "data_dir": "."}))
    expected = (f"error: data_dir ({tmp_path}) is read only by a recipe's dataset, and this job has no `recipe:`, so "
                "it would be ignored. Set `recipe:` (docs/recipes/), give each task its files under `data:` "
                "(docs/data.md), or remove data_dir.")
    for command in (["validate", str(job)], ["plan", str(job)], ["run", str(job), "--out", str(tmp_path / "out")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == expected and result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data_dir, what", [("nowhere", "no such folder"), ("job.yaml", "not a folder")])
def test_validate_and_run_refuse_a_data_dir_that_is_no_folder(tmp_path: Path, data_dir: str, what: str) -> None:
    """A relative data_dir is read from the spec's folder; one that names no folder is refused before anything runs,
    by `loom validate` as by `loom run`."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**TRAINABLE, "recipe": "medical", "data_dir": data_dir}))
    expected = (f"error: data_dir ({tmp_path / data_dir}): {what}; it holds the recipe's real data, one subfolder "
                "per split (docs/recipes/<recipe>.md). Fix the path, or remove data_dir for synthetic data.")
    for command in (["validate", str(job)], ["run", str(job), "--out", str(tmp_path / "out")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == expected and result.stdout == ""
    assert not (tmp_path / "out").exists()
