"""KV-cache decoding (runtime.generate) equals decoding by recomputing the whole sequence at every token, for Loom's own
llama kind and for a transformers LlamaForCausalLM saved in a tmp folder; sampling is reproducible per row whatever
the shard; greedy decoding equals transformers' own ``generate``; a row stops at its eos."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from planner.spec import parse_job
from runtime.generate import decoder_for, generate, lm_logits, row_generators
from runtime.reference import ReferenceTrainer

sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
from make_models import save_llama  # noqa: E402  (examples/make_models.py)

PROMPT, NEW = 5, 7


def _job(component: dict) -> object:
    return parse_job({
        "name": "gen", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"lm": component},
        "tasks": [{"name": "t", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}],
        "training": {"precision": "fp32"},
    })


def _modules(job):
    """(embed, layers, logits) of the job's lm component, as the runtime builds them."""
    ref = ReferenceTrainer(job)
    layers = [ref.modules[("lm", i)] for i in range(job.components["lm"].num_layers)]
    return ref.modules[("embed:lm", 0)], layers, lm_logits(ref.head(0))


class FullRecompute:
    """A decoder without a cache: every call runs the whole sequence so far through ``forward`` (ids -> logits)."""

    def __init__(self, forward):
        self.forward, self.ids = forward, None

    def start(self):
        self.ids = None

    def __call__(self, ids, start):
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)
        assert self.ids.shape[1] == start + ids.shape[1]
        return self.forward(self.ids)


def _loom_full(embed, layers, logits):
    def forward(ids):
        x = embed(ids)
        for layer in layers:
            x = layer(x)
        return logits(x)
    return forward


@pytest.fixture(scope="module")
def loom_model():
    job = _job({"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2,
                "vocab_size": 48, "seq_len": PROMPT + NEW})
    return _modules(job)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    folder = save_llama(tmp_path_factory.mktemp("llama") / "llama", vocab_size=48, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2)
    job = _job({"pretrained": str(folder), "seq_len": PROMPT + NEW})
    return folder, _modules(job)


def _compare_with_full(cached, full, temperature):
    prompts = torch.randint(0, 48, (6, PROMPT), generator=torch.Generator().manual_seed(1))
    rows = range(6)
    a = generate(cached, prompts, NEW, temperature, row_generators(3, 0, "t", rows, 2), keep_logits=True)
    b = generate(full, prompts, NEW, temperature, row_generators(3, 0, "t", rows, 2), keep_logits=True)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=1e-5), (a.logits - b.logits).abs().max()
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert a.generated.all() and a.tokens.shape == (6, PROMPT + NEW) and torch.equal(a.tokens[:, :PROMPT], prompts)
    return a


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_decode_equals_full_recomputation_loom_llama(loom_model, temperature):
    embed, layers, logits = loom_model
    a = _compare_with_full(decoder_for(embed, layers, logits), FullRecompute(_loom_full(embed, layers, logits)),
                           temperature)
    if temperature == 0:  # greedy: each new token is the argmax of the logits it came from
        assert torch.equal(a.tokens[:, PROMPT:], a.logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_kv_cache_decode_equals_full_recomputation_hf_llama(hf_model, temperature):
    from transformers import AutoModelForCausalLM

    folder, (embed, layers, logits) = hf_model
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        # Loom's modules with the cache against the transformers model itself, recomputing the whole sequence
        _compare_with_full(decoder_for(embed, layers, logits), FullRecompute(lambda ids: model(ids).logits),
                           temperature)


def test_greedy_equals_transformers_generate(hf_model):
    from transformers import AutoModelForCausalLM

    folder, (embed, layers, logits) = hf_model
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = torch.randint(3, 48, (3, PROMPT), generator=torch.Generator().manual_seed(2))
    eos = model.config.eos_token_id
    ours = generate(decoder_for(embed, layers, logits), prompts, NEW, 0.0, row_generators(0, 0, "t", range(3), 1),
                    eos_id=eos, pad_id=eos)
    theirs = model.generate(prompts, max_new_tokens=NEW, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    n = theirs.shape[1]  # transformers stops once every row has its eos; Loom pads to new_tokens
    assert torch.equal(ours.tokens[:, :n], theirs) and (ours.tokens[:, n:] == eos).all()


def test_a_row_samples_the_same_tokens_in_any_shard(loom_model):
    embed, layers, logits = loom_model
    prompts = torch.randint(0, 48, (8, PROMPT), generator=torch.Generator().manual_seed(4))
    whole = generate(decoder_for(embed, layers, logits), prompts, NEW, 1.0, row_generators(5, 2, "t", range(8), 4))
    part = generate(decoder_for(embed, layers, logits), prompts[4:6], NEW, 1.0,
                    row_generators(5, 2, "t", range(4, 6), 4))
    assert torch.equal(part.tokens, whole.tokens[4:6])
    other_step = generate(decoder_for(embed, layers, logits), prompts, NEW, 1.0, row_generators(5, 3, "t", range(8), 4))
    assert not torch.equal(other_step.tokens, whole.tokens)  # the seed moves with the step
    # samples of one prompt differ (the seed has the sample index)
    same = prompts[:1].expand(4, -1)
    group = generate(decoder_for(embed, layers, logits), same, NEW, 1.0, row_generators(5, 2, "t", range(4), 4))
    assert len({tuple(r.tolist()) for r in group.tokens}) > 1


def test_a_row_stops_at_its_eos_and_pads_after_it(loom_model):
    embed, layers, logits = loom_model
    prompts = torch.randint(0, 48, (3, PROMPT), generator=torch.Generator().manual_seed(6))
    gens = lambda: row_generators(0, 0, "t", range(3), 1)  # noqa: E731
    free = generate(decoder_for(embed, layers, logits), prompts, NEW, 0.0, gens())
    eos = int(free.tokens[0, PROMPT + 1])  # row 0's second new token
    stopped = generate(decoder_for(embed, layers, logits), prompts, NEW, 0.0, gens(), eos_id=eos, pad_id=47)
    first = next(j for j in range(NEW) if int(free.tokens[0, PROMPT + j]) == eos)
    assert stopped.generated[0].tolist() == [j <= first for j in range(NEW)]
    assert (stopped.tokens[0, PROMPT + first + 1:] == 47).all()
    assert torch.equal(stopped.tokens[0, :PROMPT + first + 1], free.tokens[0, :PROMPT + first + 1])
    assert (stopped.logprobs[0, first + 1:] == 0).all() and (stopped.logprobs[0, :first + 1] < 0).all()
