"""A frozen diffusers AutoencoderKL encoding a unet2d task's images into its latents (tasks[].data.vae): the encoder
equals diffusers' own, reads only the encoder's tensors, a batch's latents are the VAE's of each row's image (any
shard equals the same rows of the whole batch), training runs through the reference, and every bad input is one
line."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli import app
from planner.spec import parse_job
from runtime import sources
from runtime.data import NOISE, task_batch
from runtime.reference import ReferenceTrainer
from runtime.source_files import DataError
from runtime.unet import noise_key, timesteps_key
from runtime.vae import vae_encoder

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "examples"))
from make_models import save_unet, save_vae  # noqa: E402  (examples/make_models.py)
from make_tokenizer import build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    save_vae(root / "vae")
    save_unet(root / "unet")
    build_tokenizer(root / "tok", ["a red square", "a blue circle"])
    (root / "imgs").mkdir()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "imgs" / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": "a red square" if i % 2 else "a blue circle"})
    (root / "imgs" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def job_doc(root: Path, **data) -> dict:
    return {
        "name": "ldm", "training": {"seed": 2, "lr": 1e-3, "precision": "fp32"},
        "cluster": {"device": "cpu", "devices_per_node": 1},
        "components": {"text": {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 4,
                                "seq_len": 5, "vocab_size": 64},
                       "unet": {"pretrained": str(root / "unet")}},
        "tasks": [{"name": "gen", "batch_size": 4, "loss": "mse",
                   "components": [{"component": "text"}, {"component": "unet"}],
                   "data": {"format": "images", "path": str(root / "imgs"), "tokenizer": str(root / "tok"),
                            "vae": str(root / "vae")} | data}],
    }


def test_the_encoder_equals_diffusers_and_reads_only_its_tensors(folders, tensor_reads):
    from diffusers import AutoencoderKL

    vae_encoder.cache_clear()
    ours = vae_encoder(str(folders / "vae"))
    assert tensor_reads and all(n.startswith(("encoder.", "quant_conv.")) for n in tensor_reads), tensor_reads
    assert not any(p.requires_grad for p in ours.parameters())
    model = AutoencoderKL.from_pretrained(folders / "vae")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = model.encode(images).latent_dist.mean * model.config.scaling_factor
    got = ours(images)
    assert got.shape == (3, 4, 8, 8)
    assert float((got - want).norm() / want.norm()) <= 1e-5


def test_a_batch_holds_the_vae_latents_of_its_images_noised_per_row(folders):
    from diffusers import AutoencoderKL

    job = parse_job(job_doc(folders, shuffle=False))
    whole = task_batch(job, 0, 1, 0, 4)
    noisy, steps, noise = whole.inputs["unet"], whole.targets[timesteps_key("unet")], whole.targets[noise_key("unet")]
    assert noisy.shape == noise.shape == (4, 4, 8, 8) and steps.dtype == torch.long
    model = AutoencoderKL.from_pretrained(folders / "vae")
    for row in range(4):  # step 1 of batch 4 reads records 4, 5, 0, 1 in file order
        record = (4 + row) % 6
        with Image.open(folders / "imgs" / f"{record}.png") as img:
            pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy())
        image = (pixels.permute(2, 0, 1) / 255 - 0.5) / 0.5
        with torch.no_grad():
            x0 = model.encode(image[None]).latent_dist.mean[0] * model.config.scaling_factor
        a = float(NOISE.alpha_bar[int(steps[row])])
        want = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise[row]
        assert float((noisy[row] - want).norm() / want.norm()) <= 1e-5
    assert len(set(steps.tolist())) > 1  # a timestep per row
    for start, stop in ((0, 1), (1, 4)):  # any shard equals the same rows of the whole batch
        part = task_batch(job, 0, 1, start, stop)
        assert torch.equal(part.inputs["unet"], noisy[start:stop])
        assert torch.equal(part.targets[noise_key("unet")], noise[start:stop])


def test_a_latent_diffusion_task_trains_through_the_reference(folders):
    job = parse_job(job_doc(folders))
    trainer = ReferenceTrainer(job)
    with torch.no_grad():
        before = float(trainer.task_loss(0, 0))
    assert math.isfinite(before) and before > 0
    assert trainer.train_step(0)["gen"] == pytest.approx(before, rel=1e-6)  # the step trains on that loss


def _validate(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    sources._source.cache_clear()
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_vae_inputs_are_one_error_line(folders, tmp_path):
    doc = job_doc(folders)
    del doc["tasks"][0]["data"]["vae"]
    assert "tasks[0].data.vae: components.unet reads latents" in _validate(tmp_path, doc)
    doc = job_doc(folders, vae=str(folders / "nowhere"))
    assert "tasks[0].data.vae (" in (line := _validate(tmp_path, doc)) and "no such folder" in line
    save_vae(tmp_path / "vae8", latent_channels=8)
    line = _validate(tmp_path, job_doc(folders, vae=str(tmp_path / "vae8")))
    assert "encodes 8 latent channels but components.unet reads 4 (in_channels)" in line
    save_vae(tmp_path / "vae4", in_channels=4, out_channels=4)
    assert "the VAE encodes 4-channel images; image files give 1 (grey) or 3 (RGB)" in _validate(
        tmp_path, job_doc(folders, vae=str(tmp_path / "vae4")))
    shutil.copytree(folders / "vae", tmp_path / "vae-bad")
    cfg = json.loads((tmp_path / "vae-bad" / "config.json").read_text())
    (tmp_path / "vae-bad" / "config.json").write_text(json.dumps(cfg | {"block_out_channels": [16, 64]}))
    line = _validate(tmp_path, job_doc(folders, vae=str(tmp_path / "vae-bad")))
    assert "encoder.conv_in.weight" in line and "[32, 3, 3, 3]" in line and "[16, 3, 3, 3]" in line
    doc = job_doc(folders)
    doc["components"]["unet"] = {"pretrained": str(folders / "vae")}  # a VAE is not a component: never trained
    line = _validate(tmp_path, doc)
    assert "'AutoencoderKL' is not a component" in line and "Loom does not train it" in line and "vae:" in line
    doc = job_doc(folders)
    doc["tasks"][0]["data"] |= {"format": "text", "path": str(folders / "imgs" / "manifest.jsonl")}
    assert "vae: format text has no images to encode" in _validate(tmp_path, doc)


@pytest.mark.parametrize("changes, expected", [
    ({"latent_channels": "4"}, "latent_channels ('4') is not a whole number in 1..1048576"),
    ({"block_out_channels": [32, 0]}, "block_out_channels[1] (0) is not a whole number"),
    ({"in_channels": 1e12}, "in_channels (1000000000000.0) is not a whole number"),
    ({"block_out_channels": [32] * 21}, "block_out_channels has 21 levels, more than 17 (each halves the image side"),
    ({"scaling_factor": "x"}, "scaling_factor ('x') is not a finite number"),
], ids=["text-channels", "zero-channels", "huge-channels", "levels", "scaling"])
def test_vae_config_sizes_are_checked_at_validate(folders, tmp_path, changes, expected):
    """A VAE's config.json gets the limits a UNet's does: `2 ** 20` times larger images, or int('x') in a worker,
    were found only by the run."""
    shutil.copytree(folders / "vae", tmp_path / "vae-big")
    cfg = json.loads((tmp_path / "vae-big" / "config.json").read_text())
    (tmp_path / "vae-big" / "config.json").write_text(json.dumps(cfg | changes))
    line = _validate(tmp_path, job_doc(folders, vae=str(tmp_path / "vae-big")))
    assert line.startswith(f"error: tasks[0].data.vae: {tmp_path / 'vae-big' / 'config.json'}: {expected}"), line


def test_check_vae_without_latent_uses(folders):
    doc = job_doc(folders)
    doc["components"]["unet"] = {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                                 "image_size": 16}
    sources._source.cache_clear()
    with pytest.raises(DataError, match=r"tasks\[0\].data.vae \(.*\): no use of this task reads latents"):
        sources.check_data(parse_job(doc))
