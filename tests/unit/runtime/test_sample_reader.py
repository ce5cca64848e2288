"""A use that reads a sample use's samples as its images (planner.usegraph.sample_source): what the planner makes of
it, what its first layer reads (runtime.sampleop.sample_pixels), and what `loom run` refuses in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from planner.metagraph import build_metagraph
from planner.spec import parse_job
from recipes.diffusion.models import save_towers
from runtime.checks import check_trainable
from runtime.reference import ReferenceTrainer
from runtime.sampleop import sample_pixels

UNET = {"kind": "unet2d", "num_layers": 1, "hidden_size": 16, "channel_mults": [1, 2], "in_channels": 3,
        "image_size": 8}
VISION = {"kind": "vit", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 4, "image_size": 16,
          "frozen": True}
TEXT = {"kind": "transformer", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 4, "frozen": True}


def job(uses=None, loss="mse", vision=None, unet=None):
    """``vision``: the vision component instead of :data:`VISION`; ``unet``: fields replacing :data:`UNET`'s."""
    return parse_job({
        "name": "reader", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"unet": {**UNET, **(unet or {})}, "vision": vision or VISION, "text": TEXT},
        "tasks": [{"name": "score", "batch_size": 4, "loss": loss, "components": uses or [
            {"component": "unet", "mode": "sample", "denoise_steps": 4, "stop_steps": [2, 3], "grad_last_step": True},
            {"component": "vision", "mode": "forward"}]}],
        "training": {"steps": 1, "precision": "fp32"},
    })


def test_the_planner_prices_a_reader_of_samples_as_a_forward_use_that_passes_the_gradient_on():
    graph = build_metagraph(job())
    sample, vision = graph.metaops
    assert sample.mode == "sample" and sample.out_shapes == ((3 * 8 * 8,),)  # x0 crosses, not the last feature map
    assert sample.layer.out_bytes == 4 * 3 * 8 * 8  # fp32
    assert vision.deps == (sample.id,) and vision.input_modules == ("embed:vision",)
    assert vision.frozen and vision.backward_factor == 1.0  # no weight gradient, the input's gradient flows


def test_a_reader_embeds_the_samples_as_its_images_and_the_gradient_reaches_x0(tmp_path):
    spec = job()
    op = build_metagraph(spec).metaops[1]
    x0 = (torch.randn(4, 3 * 8 * 8) * 0.8).requires_grad_(True)
    images = sample_pixels(spec, op, x0)
    want = F.interpolate((x0.reshape(4, 3, 8, 8) / 2 + 0.5).clamp(0, 1) * 2 - 1, size=(16, 16), mode="bilinear",
                         antialias=True)  # [-1, 1] in, [0, 1] clamped, the tower's [-1, 1], its side
    torch.testing.assert_close(images, want)
    images.sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    # a pretrained CLIP tower (the diffusion recipe's) with its own normalisation (preprocessor_config.json) at 32 px
    tower, _ = save_towers(tmp_path)  # random weights
    (tower / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                "image_std": [0.2, 0.25, 0.5]}))
    spec = job(vision={"pretrained": str(tower), "frozen": True})
    op = build_metagraph(spec).metaops[1]
    unit = F.interpolate((x0.detach().reshape(4, 3, 8, 8) / 2 + 0.5).clamp(0, 1), size=(32, 32), mode="bilinear",
                         antialias=True)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(sample_pixels(spec, op, x0.detach()), (unit - mean) / std)


def test_one_process_trains_the_unet_through_a_frozen_reader():
    trainer = ReferenceTrainer(job())
    before = {k: v.clone() for k, v in trainer.named_parameters().items()}
    trainer.train_step(0, keep_gradients=True)
    grads = trainer.last_gradients
    unet = [k for k in grads if k.startswith(("unet", "embed:unet"))]
    assert unet and all(torch.isfinite(grads[k]).all() for k in unet)
    assert sum(float(grads[k].abs().sum()) for k in unet) > 0
    assert "head:score/0/conv_out.weight" in grads  # the sampled UNet's output layer lives in the task's head
    assert not any(k.startswith(("vision", "embed:vision")) for k in grads)  # frozen: no weight gradient
    after = trainer.named_parameters()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("vision", "embed:vision")))


@pytest.mark.parametrize("uses, extra, needle", [
    ([{"component": "unet", "mode": "sample", "denoise_steps": 2, "grad_last_step": True},
      {"component": "text", "mode": "forward"}], {},
     "tasks[0].components[1] ('text') reads the samples of sample use 'unet' (3 x 8 x 8 images); component 'text' "
     "(kind 'transformer') does not embed images"),
    ([{"component": "text", "name": "prompt", "mode": "forward"},
      {"component": "unet", "mode": "sample", "denoise_steps": 2, "grad_last_step": True, "after": []},
      {"component": "vision", "mode": "forward", "after": ["unet", "prompt"]}], {},
     "tasks[0].components[2] ('vision') reads the samples of sample use 'unet' (3 x 8 x 8 images) together with "
     "['prompt']; a use reads a sample use's images alone"),
    (None, {"unet": {"in_channels": 4}},
     "reads the samples of sample use 'unet' (4 x 8 x 8 images); component 'vision' embeds 3-channel images. Sample "
     "in pixel space"),
    ([{"component": "unet", "mode": "sample", "denoise_steps": 2, "grad_last_step": True}], {},
     "tasks[0] ('score'): sample use 'unet' is a leaf and loss 'mse' does not read samples"),
], ids=["not-an-image-use", "with-other-inputs", "latent-channels", "sample-leaf"])
def test_what_run_refuses_is_one_line(uses, extra, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as err:
        check_trainable(job(uses, **extra))
    assert "\n" not in str(err.value)


def test_loom_profile_times_a_readers_input_module_on_samples_of_the_shape_that_crosses():
    from runtime.profiler import time_embeddings

    timed = time_embeddings(job(), repeats=1, warmup=0)
    assert timed["score.vision"] and all(seconds > 0 for _, seconds in timed["score.vision"])


def test_one_rank_writes_a_sampled_heads_checkpoint_when_the_loss_host_is_another():
    """The loss host (rank 0) holds the head under the plan; the sampling rank 1 holds an extra copy and sees only it
    in its Assignment: both must name rank 0 the writer (two writers fail the checkpoint's index)."""
    from types import SimpleNamespace

    from runtime.portable import _writers

    key = ("head:score", 0)
    roles = SimpleNamespace(extra={key: (1,)}, synced={key: (0, 1)}, decode_copies={})
    rank0 = SimpleNamespace(holders={("head:score", 0, 0): (0,)}, roles=roles)
    rank1 = SimpleNamespace(holders={}, roles=roles)
    assert _writers(rank0)[key] == _writers(rank1)[key] == 0


def test_a_copy_only_to_decode_with_is_never_a_checkpoints_writer():
    """Rank 0 holds the policy's layer only to decode with (its matrices in bf16: runtime.rollout.lower_matrices), so
    the lowest other holder writes it: rank 1's extra copy (not only decoded with), else the trainer, rank 2."""
    from types import SimpleNamespace

    from runtime.portable import _writers

    key = ("policy", 0)
    roles = SimpleNamespace(extra={key: (0, 1)}, synced={}, decode_copies={key: (0,)})
    worker = SimpleNamespace(holders={("policy", 0, 0): (2, 3)}, roles=roles)
    assert _writers(worker)[key] == 1
    roles.decode_copies = {key: (0, 1)}
    assert _writers(worker)[key] == 2
