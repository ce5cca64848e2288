"""GRPO's left-padded prompts are never attended: a rollout decoded from a masked, padded prompt samples what the prompt
alone would (runtime.generate), and the policy's and reference's log-prob passes over the rollout (runtime.modules
.row_kwargs) equal the transformers model's own on the unpadded prompt and answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from planner.spec import parse_job
from recipes.alignment import grpo, make  # the package registers grpo_rule
from runtime.generate import PretrainedDecoder, decoder_for, generate, lm_logits, row_generators
from runtime.reference import ReferenceTrainer
from runtime.rollout import unpack
from runtime.tokenizer import prompt_mask_key

PROMPT, NEW, SAMPLES, ROWS = 24, 6, 2, 4  # prompts are 17 to 20 tokens: every row has pads


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    folder = make.write_model(tmp_path_factory.mktemp("mask") / "base", num_hidden_layers=2, hidden_size=32,
                              intermediate_size=64)
    job = parse_job({
        "name": "mask", "recipe": "alignment", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"policy": {"pretrained": str(folder)},
                       "reference": {"pretrained": str(folder), "frozen": True}},
        "tasks": [{"name": "grpo", "batch_size": ROWS, "loss": "grpo_rule", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": PROMPT, "new_tokens": NEW,
             "samples": SAMPLES, "temperature": 1.0},
            {"component": "reference", "mode": "forward", "seq_len": PROMPT + NEW, "after": ["rollout"]},
            {"component": "policy", "seq_len": PROMPT + NEW, "after": ["rollout"]}]}],
        "training": {"precision": "fp32"}})
    return folder, job, ReferenceTrainer(job)


def _decoder(ref: ReferenceTrainer) -> PretrainedDecoder:
    layers = [ref.modules[("policy", i)] for i in range(2)]
    return decoder_for(ref.modules[("embed:policy", 0)], layers, lm_logits(ref.head(0).policy))


def test_prompt_batch_masks_exactly_the_left_padding(trainer):
    _, job, _ = trainer
    batch = grpo.prompt_batch(job, 0, 0, 0, ROWS, "train")
    mask, ids = batch.targets[prompt_mask_key("rollout")], batch.inputs["rollout"]
    assert mask.dtype == torch.bool and mask.shape == ids.shape and (~mask).any(dim=1).all()
    assert (mask.long().diff(dim=1) >= 0).all()  # pads first, then the prompt
    assert (ids[~mask] == 0).all() and (ids[mask] != 0).all()  # the tokenizer's <pad> is id 0


def test_a_masked_padded_prompt_samples_what_the_prompt_alone_samples(trainer):
    _, job, ref = trainer
    batch = grpo.prompt_batch(job, 0, 0, 0, ROWS, "train")
    ids, mask = batch.inputs["rollout"], batch.targets[prompt_mask_key("rollout")]
    gens = lambda: row_generators(0, 0, "grpo", range(ROWS), SAMPLES)  # noqa: E731
    with torch.no_grad():
        padded = generate(_decoder(ref), ids, NEW, 1.0, gens(), prompt_mask=mask, keep_logits=True)
        unmasked = generate(_decoder(ref), ids, NEW, 1.0, gens(), keep_logits=True)
        for row in range(ROWS):
            alone = generate(_decoder(ref), ids[row:row + 1, mask[row]], NEW, 1.0, gens()[row:row + 1],
                             keep_logits=True)
            assert torch.equal(padded.tokens[row, PROMPT:], alone.tokens[0, -NEW:])
            torch.testing.assert_close(padded.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert (padded.logits - unmasked.logits).abs().max() > 1e-3  # attending the pads does change the rollout


def test_the_log_prob_passes_equal_the_model_on_the_unpadded_rollout(trainer):
    from transformers import AutoModelForCausalLM

    folder, job, ref = trainer
    batch = grpo.prompt_batch(job, 0, 0, 0, ROWS, "train")
    mask = batch.targets[prompt_mask_key("rollout")]
    with torch.no_grad():
        outputs = ref.forward(0, batch)
        tokens, generated = unpack(outputs["rollout"], PROMPT, NEW)
        head = ref.head(0)
        logp = head.logprobs(head.policy, outputs["policy"], tokens)
        ref_logp = head.logprobs(head.reference, outputs["reference"], tokens)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        for row in range(ROWS):
            real = tokens[row, torch.cat([mask[row], torch.ones(NEW, dtype=torch.bool)])]
            theirs = F.log_softmax(model(real[None]).logits[0, -NEW - 1:-1].float(), dim=-1)
            theirs = theirs.gather(1, real[-NEW:, None]).squeeze(1)
            counted = generated[row]
            torch.testing.assert_close(logp[row][counted], theirs[counted], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ref_logp[row][counted], theirs[counted], atol=1e-4, rtol=1e-4)
