"""Worker processes and shared inputs for tests/integration/test_feedback_split.py.

A separate module so that spawned children import the worker by name. The models are read from the folders the
test saved, the prompts and scorers are drawn from fixed seeds, identically in the test process and in every worker,
so only x0 and its gradient travel between processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.feedback import ClipScorer, FeedbackBatch, FeedbackObjective, LinearScorer, frozen
from runtime.sample import SDXL_SCHEDULE, SampleConfig, build_scheduler
from runtime.vae import vae_decoder

CONFIG = SampleConfig(steps=10, stop=(6, 9), seed=0, scheduler_config=SDXL_SCHEDULE)  # short: the test is about the split
SHAPE = (4, 8, 8)  # the tiny UNet's latents
ROWS, SAMPLES, STEP, TASK = 2, 2, 3, "feedback"  # 2 prompts x 2 samples; one sampling worker per prompt
SAMPLERS, SCORER = (0, 1), 2


def prompts() -> torch.Tensor:
    """The batch's prompts: 6 token ids each, ending in end-of-text (1), where CLIP's text towers pool."""
    ids = torch.randint(2, 100, (ROWS, 6), generator=torch.Generator().manual_seed(5))
    ids[:, -1] = 1
    return ids


def unet(folder: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder / "unet")


def batch(folder: Path, start: int = 0, rows: int = ROWS) -> FeedbackBatch:
    """Prompt rows [start, start + rows): the frozen text encoder's context for the UNet, the ids for the CLIP
    scorer (the pixel scorer reads the image alone)."""
    from transformers import CLIPTextModel

    ids = prompts()[start:start + rows]
    with torch.no_grad():
        context = frozen(CLIPTextModel.from_pretrained(folder / "text"))(input_ids=ids).last_hidden_state
    return FeedbackBatch(context, [ids, None], batch_size=ROWS * SAMPLES, start=start, samples=SAMPLES)


def objective(folder: Path) -> FeedbackObjective:
    from transformers import CLIPModel

    scorers = [ClipScorer(CLIPModel.from_pretrained(folder / "clip")), LinearScorer(3 * 16 * 16, seed=1)]
    return FeedbackObjective(vae_decoder(str(folder / "vae")), scorers)


def worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """Ranks 0 and 1 sample one prompt each (its 2 samples) with their own UNet and send x0 to rank 2, which decodes
    and scores all 4 samples and sends each sampler the gradient of the loss with respect to its x0; the samplers
    backpropagate it and all-reduce (sum) their UNet gradients."""
    from runtime.feedback import sample_batch, score_x0
    from runtime.sample import diffusers_denoiser

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    samplers = dist.new_group(list(SAMPLERS))
    root, scheduler = Path(folder), build_scheduler(CONFIG)
    shape = (SAMPLES, *SHAPE)
    try:
        if rank in SAMPLERS:
            model = unet(root)
            sample = sample_batch(diffusers_denoiser(model), scheduler, batch(root, start=rank, rows=1), CONFIG, SHAPE,
                                  STEP, TASK)
            dist.send(sample.x0.detach().contiguous(), SCORER)
            grad = torch.empty(shape)
            dist.recv(grad, SCORER)
            sample.x0.backward(grad)
            grads = {name: p.grad for name, p in model.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g, group=samplers)
            if rank == 0:
                torch.save({"grads": grads, "latents": sample.latents}, Path(out) / "sampler.pt")
        else:
            parts = [torch.empty(shape) for _ in SAMPLERS]
            for src, part in zip(SAMPLERS, parts):
                dist.recv(part, src)
            inputs = batch(root).scorer_inputs
            scored = score_x0(torch.cat(parts), objective(root),
                              [inputs[0].repeat_interleave(SAMPLES, dim=0), None], ROWS * SAMPLES)
            for i, dst in enumerate(SAMPLERS):
                dist.send(scored.grad_x0[i * SAMPLES:(i + 1) * SAMPLES].contiguous(), dst)
            torch.save({"loss": scored.loss, "rewards": scored.rewards}, Path(out) / "scorer.pt")
    finally:
        dist.destroy_process_group()
