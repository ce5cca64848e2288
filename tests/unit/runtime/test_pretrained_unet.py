"""Pretrained diffusers UNet2DConditionModel components: the config read as unet2d fields, configs Loom cannot run
refused in one line, the model's own blocks (only their tensors read), single-process training equal to the
diffusers model's, and the export round trip."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import load_job
from planner.unet import unet_blocks
from runtime.data import synthetic_batch
from runtime.export import component_tensors, export_pretrained
from runtime.modules import build_layer
from runtime.reference import ReferenceTrainer
from runtime.unet import noise_key, timesteps_key

sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
from make_models import save_unet  # noqa: E402  (examples/make_models.py)

RTOL = 1e-5
TEXT = {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "seq_len": 5, "vocab_size": 20}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_unet(root / "unet")
    return root


def write_job(folder: Path, pretrained: str = "unet", text: bool = True, **component) -> Path:
    """A text encoder (32 wide, as the UNet's cross_attention_dim) feeding a pretrained UNet denoising 8 px latents."""
    uses = ([{"component": "text"}] if text else []) + [{"component": "unet"}]
    doc = {
        "name": "sd", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"unet": {"pretrained": pretrained, **component}, "text": TEXT},
        "tasks": [{"name": "gen", "batch_size": 3, "loss": "mse", "components": uses}],
        "training": {"steps": 3, "lr": 1e-3, "precision": "fp32"},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _set_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | changes))


def test_the_config_maps_to_unet2d_fields_and_the_layout_follows_it(models):
    comp = load_job(write_job(models)).components["unet"]
    assert (comp.kind, comp.hidden_size, comp.channel_mults, comp.num_layers) == ("unet2d", 32, [1, 2], 1)
    assert (comp.in_channels, comp.image_size, comp.num_heads) == (4, 8, 4)
    # CrossAttnDownBlock2D at full resolution, DownBlock2D below; the up path mirrors it; the mid block attends
    blocks = unet_blocks(comp, 8)
    assert [(b.level, b.up, b.mid, b.attention) for b in blocks] == [
        (0, False, False, True), (1, False, False, False), (1, False, True, True),
        (1, True, False, False), (1, True, False, False), (0, True, False, True), (0, True, False, True)]
    with pytest.raises(SpecError, match=r"components.unet: hidden_size \(64\) contradicts .*config.json \(32\)"):
        load_job(write_job(models, hidden_size=64))


@pytest.mark.parametrize("changes, expected", [
    ({"transformer_layers_per_block": 2}, "'transformer_layers_per_block' (2) means more than one transformer layer"),
    ({"class_embed_type": "timestep"}, "'class_embed_type' ('timestep') means a class embedding"),
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "'down_block_types' (['AttnDownBlock2D', 'DownBlock2D'])"),
    ({"cross_attention_dim": 16}, "'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight' has shape [32, 32]"
                                  " but config.json implies [32, 16]"),
    ({"sample_size": [8, 16]}, "'sample_size' ([8, 16]) means non-square latents"),
    ({"_class_name": "AutoencoderKL"}, "'AutoencoderKL' is not a component: a VAE is frozen"),
], ids=["transformer-layers", "class-embedding", "block-type", "weights-do-not-match", "non-square", "vae"])
def test_a_config_loom_cannot_run_is_one_error_line(models, tmp_path, changes, expected):
    shutil.copytree(models / "unet", tmp_path / "unet")
    _set_config(tmp_path / "unet", **changes)
    result = CliRunner().invoke(app, ["validate", str(write_job(tmp_path))])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: components.unet: "), lines
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("changes, expected", [
    ({"layers_per_block": 10**9}, "layers_per_block (1000000000) is not a whole number in 1..1024"),
    ({"layers_per_block": [1, 10**9]}, "layers_per_block[1] (1000000000) is not a whole number in 1..1024"),
    ({"block_out_channels": [10**12, 2 * 10**12]}, "block_out_channels[0] (1000000000000) is not a whole number in "
                                                   "1..1048576"),
    ({"block_out_channels": [0, 64]}, "block_out_channels[0] (0) is not a whole number"),  # was a ZeroDivisionError
    ({"sample_size": 10**7}, "sample_size (10000000) is not a whole number in 1..65536"),
    ({"in_channels": 1e9}, "in_channels (1000000000.0) is not a whole number"),
    ({"attention_head_dim": [4, 0]}, "attention_head_dim[1] (0) is not a whole number"),
    ({"cross_attention_dim": True}, "cross_attention_dim (True) is not a whole number"),
    ({"conv_in_kernel": 10**9}, "conv_in_kernel (1000000000) is not a whole number in 1..65536"),
], ids=["layers", "layers-per-level", "channels", "zero-channels", "sample-size", "float-channels", "zero-heads",
        "bool-context", "kernel"])
def test_config_sizes_meet_the_spec_limits_at_validate(models, tmp_path, changes, expected):
    """The limits the transformer configs get (planner.pretrained): a UNet config's sizes are checked before
    anything iterates over them (1e9 layers per block hung validate)."""
    shutil.copytree(models / "unet", tmp_path / "unet")
    _set_config(tmp_path / "unet", **changes)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(write_job(tmp_path))])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: components.unet: {tmp_path / 'unet' / 'config.json'}: {expected}"), line
    assert line.endswith("(the limit that keeps planning bounded, docs/job-spec.md \"Limits\"). Fix config.json, or "
                         "re-save the model with save_pretrained."), line


@pytest.mark.parametrize("text_width, got", [(None, "no context (a root use)"), (16, "a context 16 wide")])
def test_a_use_without_a_context_of_cross_attention_dim_is_one_error_line(models, tmp_path, text_width, got):
    doc = yaml.safe_load(write_job(models, text=text_width is not None).read_text())
    doc["components"] |= {"unet": {"pretrained": str(models / "unet")}, "text": TEXT | {"hidden_size": text_width or 32}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: components.unet: a use reads {got} but {models / 'unet'}/config.json has cross_attention_dim 32. "
        "Feed every use from an upstream use of hidden_size 32 (e.g. a text encoder)."]


def test_a_worker_reads_only_the_tensors_of_the_blocks_it_holds(models, tensor_reads):
    from planner.pretrained import read_header

    job = load_job(write_job(models))
    op = next(op for op in build_metagraph(job).metaops if op.name == "gen.unet#4")  # the full-resolution up level
    read = tensor_reads
    build_layer(job, op, 1)
    prefixes = ("up_blocks.1.resnets.1.", "up_blocks.1.attentions.1.")
    names = read_header(models / "unet" / "diffusion_pytorch_model.safetensors")
    want = sorted(name for name in names if name.startswith(prefixes))
    assert sorted(read) == want and len(want) > 20


def _diffusers_side(job, reference: ReferenceTrainer, folder: Path):
    """UNet2DConditionModel from ``folder`` with copies of Loom's (seeded) text encoder, as one model to train."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder)
    text = torch.nn.ModuleList([copy.deepcopy(reference.modules[("embed:text", 0)]),
                                copy.deepcopy(reference.modules[("text", 0)])])

    def predict(batch):
        context = text[1](text[0](batch.inputs["text"]))
        return unet(batch.inputs["unet"], batch.targets[timesteps_key("unet")], encoder_hidden_states=context).sample

    return unet, torch.nn.ModuleList([unet, text]), predict


def test_single_process_training_equals_the_diffusers_model(models):
    """Loom's blocks composed equal UNet2DConditionModel's forward (predicted noise), and 3 steps of Loom's
    single-process training equal the diffusers model trained by hand with the job's AdamW: losses per step and the
    UNet's gradients of the first step (mapped to the checkpoint's names as export maps them)."""
    job = load_job(write_job(models))
    reference = ReferenceTrainer(job)
    unet, model, predict = _diffusers_side(job, reference, models / "unet")
    train = job.training
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, eps=train.adam_eps)
    batch = synthetic_batch(job, 0, 0, 0, 3)
    with torch.no_grad():
        head = reference.head(0)
        ours = head.conv_out(torch.nn.functional.silu(head.norm_out(reference.forward(0, batch)["unet"].reshape(3, -1, 8, 8))))
        want = predict(batch)
    assert float((ours - want).norm() / want.norm()) <= RTOL
    for step in range(3):
        batch = synthetic_batch(job, 0, step, 0, 3)
        loss = torch.nn.functional.mse_loss(predict(batch), batch.targets[noise_key("unet")])
        loss.backward()
        if step == 0:
            hf_grads = {name: p.grad.clone() for name, p in unet.named_parameters()}
        opt.step()
        opt.zero_grad()
        got = reference.train_step(step, keep_gradients=step == 0)["gen"]
        assert abs(got - float(loss.detach())) <= RTOL * float(loss.detach()), (step, got, float(loss.detach()))
        if step == 0:
            grads = component_tensors(job, "unet", reference.last_gradients)
    assert set(grads) == set(hf_grads)
    for name, g in hf_grads.items():
        err = float((grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err <= RTOL, (name, err)


def test_the_exported_unet_loads_with_from_pretrained_and_predicts_the_same_noise(models, tmp_path):
    from diffusers import UNet2DConditionModel

    job = load_job(write_job(models))
    reference = ReferenceTrainer(job)
    reference.train_step(0)
    written = export_pretrained(job, reference.named_parameters(), tmp_path / "export")
    assert written == [tmp_path / "export" / "unet"]
    assert sorted(p.name for p in written[0].iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    exported = UNet2DConditionModel.from_pretrained(written[0])
    source = UNet2DConditionModel.from_pretrained(models / "unet")
    name = "up_blocks.1.attentions.0.proj_out.weight"
    assert not torch.equal(dict(exported.named_parameters())[name], dict(source.named_parameters())[name])
    batch = synthetic_batch(job, 0, 5, 0, 3)
    with torch.no_grad():
        context = reference.modules[("text", 0)](reference.modules[("embed:text", 0)](batch.inputs["text"]))
        want = exported(batch.inputs["unet"], batch.targets[timesteps_key("unet")], encoder_hidden_states=context).sample
        head = reference.head(0)
        ours = head.conv_out(torch.nn.functional.silu(head.norm_out(reference.forward(0, batch)["unet"].reshape(3, -1, 8, 8))))
    assert float((ours - want).norm() / want.norm()) <= RTOL
