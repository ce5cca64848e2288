"""runtime.modules and runtime.embeddings: deterministic layers, their exact math, embeddings, loss heads, and an
end-to-end backward."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from planner.components import resolve_shape
from planner.metagraph import build_metagraph
from planner.errors import SpecError
from planner.spec import JobSpec, parse_job
from planner.usegraph import leaf_uses, root_uses, upstream_uses
from runtime.data import synthetic_batch, task_loss_sum
from runtime.heads import NUM_CLASSES, build_head
from runtime.embeddings import build_embed
from runtime.modules import TransformerBlock, build_layer, layer_kwargs, layer_seed, run_layers

ROOT = Path(__file__).resolve().parents[3]
H, HEADS, SEQ, BATCH = 32, 4, 8, 6


def make_job(frozen_text: bool = False, **losses: str) -> object:
    """Tasks: cls (text -> feats chain, CE), clip (image and text branches, contrastive), gen (llama, lm),
    reg (feats alone, mse). ``text`` is shared by cls and clip; ``feats`` by cls and reg."""
    return parse_job({
        "name": "tiny",
        "components": {
            "text": {"kind": "transformer", "num_layers": 2, "hidden_size": H, "num_heads": HEADS, "seq_len": SEQ,
                     "vocab_size": 50, "frozen": frozen_text},
            "image": {"kind": "vit", "num_layers": 1, "hidden_size": H, "num_heads": HEADS, "patch_size": 4,
                      "image_size": 8},
            "feats": {"kind": "mlp", "num_layers": 2, "hidden_size": H},
            "lm": {"kind": "llama", "num_layers": 1, "hidden_size": H, "num_heads": HEADS, "num_kv_heads": 2,
                   "seq_len": SEQ},
        },
        "tasks": [
            {"name": "cls", "batch_size": BATCH, "loss": losses.get("cls", "cross_entropy"),
             "components": [{"component": "text"}, {"component": "feats", "seq_len": SEQ}]},
            {"name": "clip", "batch_size": BATCH, "loss": losses.get("clip", "contrastive"),
             "components": [{"component": "image"}, {"component": "text", "after": []}]},
            {"name": "gen", "batch_size": BATCH, "loss": "lm", "components": [{"component": "lm"}]},
            {"name": "reg", "batch_size": BATCH, "loss": "mse", "components": [{"component": "feats"}]},
        ],
    })


@pytest.fixture(scope="module")
def job():
    return make_job()


def op_named(job, name: str):
    return next(op for op in build_metagraph(job).metaops if op.name == name)


def state_bytes(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- determinism


def test_same_param_group_gives_bit_identical_layers_and_layers_differ(job) -> None:
    cls_text, clip_text = op_named(job, "cls.text"), op_named(job, "clip.text")
    assert cls_text.param_group == clip_text.param_group
    for index in range(cls_text.num_layers):
        a, b = build_layer(job, cls_text, index), build_layer(job, clip_text, index)
        assert state_bytes(a) == state_bytes(b)
    first, second = build_layer(job, cls_text, 0), build_layer(job, cls_text, 1)
    assert not torch.equal(first.qkv.weight, second.qkv.weight)
    other = build_layer(job, op_named(job, "clip.image"), 0)  # same shapes, another component
    assert not torch.equal(first.qkv.weight, other.qkv.weight)


def test_seed_changes_weights() -> None:
    job_a, job_b = make_job(), make_job().model_copy(update={"training": make_job().training.model_copy(update={"seed": 1})})
    op = op_named(job_a, "cls.text")
    assert not torch.equal(build_layer(job_a, op, 0).fc1.weight, build_layer(job_b, op, 0).fc1.weight)


def test_layers_are_identical_across_processes(job) -> None:
    """Another interpreter with a different hash seed builds the same seed and bytes (hashlib, not hash())."""
    code = (
        "import sys; sys.path.insert(0, 'tests/unit/runtime');"
        "from test_modules import make_job, op_named, state_bytes;"
        "from runtime.modules import build_layer, layer_seed;"
        "job = make_job(); print(layer_seed(7, 'text', 1), state_bytes(build_layer(job, op_named(job, 'cls.text'), 1)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seed, digest = result.stdout.split()
    assert int(seed) == layer_seed(7, "text", 1)
    assert digest == state_bytes(build_layer(job, op_named(job, "cls.text"), 1))


def test_building_does_not_touch_the_global_rng(job) -> None:
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    build_layer(job, op_named(job, "cls.text"), 0)
    build_embed(job, "image")
    build_head(job, 0)
    assert torch.equal(torch.rand(4), expected)


def test_init_follows_the_contract(job) -> None:
    block = build_layer(job, op_named(job, "cls.text"), 0)
    assert torch.equal(block.ln1.weight, torch.ones(H)) and torch.equal(block.ln2.bias, torch.zeros(H))
    assert torch.equal(block.qkv.bias, torch.zeros(3 * H))
    assert abs(block.fc1.weight.std().item() - H ** -0.5) < 0.1 * H ** -0.5  # normal(0, 1/sqrt(fan_in))
    assert abs(block.fc2.weight.std().item() - (4 * H) ** -0.5) < 0.1 * (4 * H) ** -0.5
    text = build_embed(job, "text")
    assert abs(text.tokens.weight.std().item() - 0.02) < 0.002  # embedding tables: normal(0, INIT_STD)


def test_vit_positions_start_as_a_two_dimensional_sin_cos_grid(job) -> None:
    embed = build_embed(job, "image")
    side = math.isqrt(embed.positions.shape[0] - 1)
    grid = embed.positions[1:].detach().reshape(side, side, H)
    quarter = H // 4
    # the x half depends on the column only, the y half on the row only; distance grows with separation
    torch.testing.assert_close(grid[0, :, :2 * quarter], grid[-1, :, :2 * quarter])
    torch.testing.assert_close(grid[:, 0, 2 * quarter:], grid[:, -1, 2 * quarter:])
    assert torch.equal(grid[0, 0, quarter:2 * quarter], torch.ones(quarter))  # cos(0)
    assert grid[0, 1, 0].item() == pytest.approx(math.sin(1.0)) and grid[1, 0, 2 * quarter].item() == pytest.approx(math.sin(1.0))


def test_weight_counts_match_the_planner(job) -> None:
    """The modules are the layers the planner costs: weight matrices (no biases, norms) = LayerSegment.params."""
    for op in build_metagraph(job).metaops:
        layer = build_layer(job, op, 0)
        matrices = sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
        assert matrices == op.layer.params, op.name
        assert layer(torch.randn(2, 5, H)).shape == (2, 5, H)


# --------------------------------------------------------------------------- exact math


def test_transformer_block_equals_functional_math(job) -> None:
    block = build_layer(job, op_named(job, "cls.text"), 1)
    with torch.no_grad():  # non-trivial norms and biases, so their roles are checked too
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape))
    x = torch.randn(3, SEQ, H)
    p = dict(block.named_parameters())
    d = H // HEADS
    y = F.layer_norm(x, (H,), p["ln1.weight"], p["ln1.bias"], eps=1e-5)
    heads = []
    for rows in range(3):  # q, k, v are the first, second and third h rows of qkv
        t = F.linear(y, p["qkv.weight"][rows * H:(rows + 1) * H], p["qkv.bias"][rows * H:(rows + 1) * H])
        heads.append(t.view(3, SEQ, HEADS, d).permute(0, 2, 1, 3))
    attn = F.scaled_dot_product_attention(*heads, is_causal=False)
    x1 = x + F.linear(attn.permute(0, 2, 1, 3).reshape(3, SEQ, H), p["proj.weight"], p["proj.bias"])
    z = F.layer_norm(x1, (H,), p["ln2.weight"], p["ln2.bias"], eps=1e-5)
    mid = F.linear(z, p["fc1.weight"], p["fc1.bias"])
    expected = x1 + F.linear(0.5 * mid * (1 + torch.erf(mid / math.sqrt(2))), p["fc2.weight"], p["fc2.bias"])
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert block.fc1.out_features == 4 * H


def test_llama_block_math_gqa_and_causality(job) -> None:
    block = build_layer(job, op_named(job, "gen.lm"), 0)
    d, kv_heads = H // HEADS, 2
    assert block.q_proj.weight.shape == (H, H)
    assert block.k_proj.weight.shape == block.v_proj.weight.shape == (kv_heads * d, H)
    assert block.gate_proj.weight.shape == (256, H)  # 8/3 * 32 rounded up to 256, as the planner sizes it
    assert all(getattr(block, n).bias is None for n in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    with torch.no_grad():
        block.attn_norm.weight.add_(0.1 * torch.randn(H))
    x = torch.randn(2, SEQ, H)
    p = dict(block.named_parameters())
    y = F.rms_norm(x, (H,), p["attn_norm.weight"], eps=1e-6)
    q = F.linear(y, p["q_proj.weight"]).view(2, SEQ, HEADS, d).transpose(1, 2)
    k = F.linear(y, p["k_proj.weight"]).view(2, SEQ, kv_heads, d).transpose(1, 2)
    v = F.linear(y, p["v_proj.weight"]).view(2, SEQ, kv_heads, d).transpose(1, 2)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x1 = x + F.linear(attn.transpose(1, 2).reshape(2, SEQ, H), p["o_proj.weight"])
    z = F.rms_norm(x1, (H,), p["mlp_norm.weight"], eps=1e-6)
    expected = x1 + F.linear(F.silu(F.linear(z, p["gate_proj.weight"])) * F.linear(z, p["up_proj.weight"]),
                             p["down_proj.weight"])
    out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    changed = x.clone()
    changed[:, 5] += 1.0
    out2 = block(changed)
    assert torch.equal(out2[:, :5], out[:, :5])  # earlier positions never see a later token
    assert not torch.allclose(out2[:, 5:], out[:, 5:])


def test_mlp_block_is_residual_gelu(job) -> None:
    block = build_layer(job, op_named(job, "reg.feats"), 1)
    x = torch.randn(2, 3, H)
    torch.testing.assert_close(block(x), x + F.gelu(x @ block.fc.weight.T + block.fc.bias))


def decoder_job(vocab: int | None, root: bool = False) -> JobSpec:
    dec = {"kind": "decoder", "num_layers": 1, "hidden_size": H, "num_heads": HEADS, "seq_len": 3, "cross_seq_len": 4}
    if vocab:
        dec["vocab_size"] = vocab
    uses = [{"component": "dec"}] if root else [{"component": "image"}, {"component": "dec"}]
    return parse_job({
        "name": "dec",
        "components": {"image": make_job().model_dump()["components"]["image"] | {"hidden_size": 2 * H}, "dec": dec},
        "tasks": [{"name": "t", "batch_size": 2, "components": uses}],
    })


def test_decoder_layer_passes_memory_through_and_attends_to_it() -> None:
    job = decoder_job(vocab=None)
    op = op_named(job, "t.dec")
    assert layer_kwargs(job, op) == {"stream_len": 3}
    layer = build_layer(job, op, 0)
    state = torch.randn(2, 3 + 5, H)
    out = layer(state, stream_len=3)
    torch.testing.assert_close(out[:, 3:], state[:, 3:])  # memory rows unchanged
    other = state.clone()
    other[:, 3:] += torch.randn(2, 5, H)  # (not a constant: the memory LayerNorm would remove it)
    assert not torch.allclose(layer(other, stream_len=3)[:, :3], out[:, :3])  # the stream reads the memory


def test_token_decoder_is_causal_and_its_bridge_embeds_ids_and_memory() -> None:
    job = decoder_job(vocab=11)
    layer = build_layer(job, op_named(job, "t.dec"), 0)
    state = torch.randn(1, 3 + 5, H)
    changed = state.clone()
    changed[:, 2] += 1.0  # the last stream position
    a, b = layer(state, stream_len=3), layer(changed, stream_len=3)
    torch.testing.assert_close(a[:, :2], b[:, :2])  # earlier positions do not see it
    bridge = build_embed(job, "dec")
    memory = torch.randn(2, 5, 2 * H)  # the encoder is twice as wide: the bridge projects it
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = bridge(memory, ids, stream_len=3)
    assert out.shape == (2, 8, H)
    torch.testing.assert_close(out[:, :3], bridge.tokens(ids))
    torch.testing.assert_close(out[:, 3:], bridge.memory(memory))


def test_decoder_without_upstream_use_is_refused() -> None:
    with pytest.raises(SpecError, match=r"tasks\[0\].components\[0\] \('dec'\) is a decoder use with no upstream use"):
        build_embed(decoder_job(vocab=None, root=True), "dec")


def test_frozen_component_builds_frozen_modules() -> None:
    job = make_job(frozen_text=True)
    assert not any(p.requires_grad for p in build_layer(job, op_named(job, "cls.text"), 0).parameters())
    assert not any(p.requires_grad for p in build_embed(job, "text").parameters())
    assert all(p.requires_grad for p in build_layer(job, op_named(job, "cls.feats"), 0).parameters())
    assert all(p.requires_grad for p in build_head(job, 0).parameters())


# --------------------------------------------------------------------------- embeddings


def test_embed_outputs_have_the_planners_sequence_lengths(job) -> None:
    for t, task in enumerate(job.tasks):
        batch = synthetic_batch(job, t, step=0, start=0, stop=BATCH)
        for use in root_uses(job, t):
            u = next(i for i, c in enumerate(task.components) if c.use_name == use)
            spec = task.components[u]
            seq = resolve_shape(job.components[spec.component], spec.component, spec, "use").seq_len
            out = build_embed(job, spec.component)(batch.inputs[use])
            assert out.shape == (BATCH, seq, H), (task.name, use)
    assert resolve_shape(job.components["image"], "image", job.tasks[1].components[0], "u").seq_len == (8 // 4) ** 2 + 1


def test_vit_embed_serves_uses_with_different_image_sizes() -> None:
    base = make_job().model_dump()
    base["tasks"].append({"name": "big", "batch_size": 2, "components": [{"component": "image", "image_size": 16}]})
    job = parse_job(base)
    embed = build_embed(job, "image")
    assert embed.positions.shape == ((16 // 4) ** 2 + 1, H)
    assert embed(torch.randn(2, 3, 16, 16)).shape == (2, 17, H)
    assert embed(torch.randn(2, 3, 8, 8)).shape == (2, 5, H)
    # the 2 x 2 grid's positions are the 4 x 4 grid's, resized: each the mean of the 2 x 2 block it covers
    with torch.no_grad():
        table = embed.positions[1:].reshape(4, 4, H)
        want = table.reshape(2, 2, 2, 2, H).mean(dim=(1, 3)).reshape(4, H)
        zeros = torch.zeros(1, 3, 8, 8)
        got = embed(zeros)[0, 1:] - embed.patch.bias
    torch.testing.assert_close(got, want)


def test_embed_is_shared_and_deterministic(job) -> None:
    assert state_bytes(build_embed(job, "text")) == state_bytes(build_embed(job, "text"))
    ids = torch.tensor([[1, 2, 3]])
    emb = build_embed(job, "text")
    torch.testing.assert_close(emb(ids), emb.tokens.weight[ids] + emb.positions[:3])


# --------------------------------------------------------------------------- task graph and heads


def test_roots_and_leaves_of_chains_and_branches(job) -> None:
    assert (root_uses(job, 0), leaf_uses(job, 0)) == (["text"], ["feats"])
    assert (root_uses(job, 1), leaf_uses(job, 1)) == (["image", "text"], ["image", "text"])
    fused = parse_job({
        "name": "fused", "components": make_job().model_dump()["components"],
        "tasks": [{"name": "f", "batch_size": 2, "components": [
            {"component": "image"}, {"component": "text", "after": []},
            {"component": "feats", "after": ["image", "text"], "seq_len": 5}]}],
    })
    assert upstream_uses(fused.tasks[0]) == {"image": [], "text": [], "feats": ["image", "text"]}
    assert (root_uses(fused, 0), leaf_uses(fused, 0)) == (["image", "text"], ["feats"])


def test_cross_entropy_head_matches_hand_computation(job) -> None:
    head = build_head(job, 0)
    batch = synthetic_batch(job, 0, step=0, start=0, stop=BATCH)
    out = torch.randn(BATCH, SEQ, H)
    losses = head({"feats": out}, batch)
    assert losses.shape == (BATCH,)
    out = F.layer_norm(out, (H,), eps=1e-5)  # the head's final LayerNorm, at its initial weight 1 and bias 0
    w, b = head.out.weight.detach(), head.out.bias.detach()
    for i in range(BATCH):
        logits = [(sum(out[i].mean(0)[j] * w[c, j] for j in range(H)) + b[c]).item() for c in range(NUM_CLASSES)]
        log_z = math.log(sum(math.exp(v) for v in logits))
        assert losses[i].item() == pytest.approx(log_z - logits[batch.labels[i]], rel=1e-5)


def test_mse_and_contrastive_heads(job) -> None:
    reg = build_head(job, 3)
    batch = synthetic_batch(job, 3, step=0, start=0, stop=BATCH)
    out = torch.randn(BATCH, 1, H)
    pred = F.layer_norm(out[:, 0], (H,), eps=1e-5) @ reg.out.weight[0] + reg.out.bias[0]
    torch.testing.assert_close(reg({"feats": out}, batch), (pred - batch.labels) ** 2)

    clip = build_head(job, 1)
    a = torch.randn(BATCH, SEQ, H)
    b = a.mean(1, keepdim=True).repeat(1, 3, 1)  # same pooled vector (length differs)
    b[:3] *= -1  # first half opposite
    losses = clip({"image": a, "text": b}, synthetic_batch(job, 1, 0, 0, BATCH))
    torch.testing.assert_close(losses, torch.tensor([2.0] * 3 + [0.0] * 3), atol=1e-5, rtol=0)


def test_infonce_head_scores_each_row_against_the_whole_batch(job) -> None:
    data = make_job().model_dump()
    data["tasks"][1]["loss"] = "infonce"
    clip_job = parse_job(data)
    head = build_head(clip_job, 1)
    a, b = torch.randn(BATCH, SEQ, H), torch.randn(BATCH, SEQ, H)
    full = synthetic_batch(clip_job, 1, 0, 0, BATCH)
    losses = head({"image": a, "text": b}, full)
    pa, pb = (F.normalize(F.layer_norm(x, (H,), eps=1e-5).mean(1), dim=-1) for x in (a, b))
    logits = (pa @ pb.T) / 0.07
    rows = torch.arange(BATCH)
    want = 0.5 * (F.cross_entropy(logits, rows, reduction="none") + F.cross_entropy(logits.T, rows, reduction="none"))
    torch.testing.assert_close(losses, want)
    # a shard scores its own rows against every row it gathers, so the shards' losses are the full batch's
    half = BATCH // 2
    shard = synthetic_batch(clip_job, 1, 0, half, BATCH)
    first_halves = iter(p[:half].detach() for p in head.pooled({"image": a, "text": b}))  # leaf order: image, text

    def gather(x: torch.Tensor) -> torch.Tensor:  # stands in for the executor's all-gather of the other shard's rows
        return torch.cat([next(first_halves), x])

    assert shard.first_row == half
    shard_losses = head({"image": a[half:], "text": b[half:]}, replace(shard, gather_rows=gather))
    torch.testing.assert_close(shard_losses, want[half:])


def test_next_token_head_predicts_the_following_input_id(job) -> None:
    head = build_head(job, 2)
    batch = synthetic_batch(job, 2, step=0, start=0, stop=BATCH)
    out = torch.randn(BATCH, SEQ, H)
    losses = head({"lm": out}, batch)
    logp = torch.log_softmax(F.layer_norm(out, (H,), eps=1e-5) @ head.out.weight.T + head.out.bias, dim=-1)
    ids = batch.inputs["lm"]
    expected = torch.stack([-logp[i, torch.arange(SEQ - 1), ids[i, 1:]].mean() for i in range(BATCH)])
    torch.testing.assert_close(losses, expected)


def test_head_errors_name_the_task() -> None:
    with pytest.raises(ValueError, match=r"tasks\[0\] \('cls'\)\.loss \('focal'\).*supported: cross_entropy, mse"):
        build_head(make_job(cls="focal"), 0)
    with pytest.raises(ValueError, match=r"'cls'.*contrastive.*exactly two leaf uses.*\['feats'\]"):
        build_head(make_job(cls="contrastive"), 0)
    with pytest.raises(ValueError, match=r"'clip'.*llama"):
        build_head(make_job(clip="lm"), 1)


# --------------------------------------------------------------------------- end to end


def run_task(job, t: int, layers: dict, embeds: dict, heads: dict) -> torch.Tensor:
    """Single-process reference: embed roots, run every MetaOp's layers in order, head, mean loss."""
    task = job.tasks[t]
    batch = synthetic_batch(job, t, step=0, start=0, stop=task.batch_size)
    ups = upstream_uses(task)
    ops = build_metagraph(job).ops_of_task(task.name)
    outputs = {}
    for use in task.components:
        name = use.use_name
        x = embeds[use.component](batch.inputs[name]) if not ups[name] else outputs[ups[name][0]]
        for op in ops:
            if op.name == f"{task.name}.{name}":
                for i in range(op.num_layers):
                    x = layers[(op.param_group, i)](x)
        outputs[name] = x
    return task_loss_sum(heads[t], {leaf: outputs[leaf] for leaf in leaf_uses(job, t)}, batch, task.batch_size)


def test_end_to_end_backward_reaches_shared_layers_from_both_tasks() -> None:
    job = make_job()
    job = job.model_copy(update={"tasks": job.tasks[:2]})  # cls and clip share `text`
    graph = build_metagraph(job)
    layers = {(op.param_group, i): build_layer(job, op, i) for op in graph.metaops for i in range(op.num_layers)}
    embeds = {name: build_embed(job, name) for name in job.components if name != "lm"}
    heads = {t: build_head(job, t) for t in range(len(job.tasks))}
    shared = layers[("text", 0)].qkv.weight

    grads = []
    for t in range(2):
        run_task(job, t, layers, embeds, heads).backward()
        grads.append(shared.grad.clone())
        shared.grad = None
    assert all(g.abs().sum() > 0 for g in grads)
    total = run_task(job, 0, layers, embeds, heads) + run_task(job, 1, layers, embeds, heads)
    total.backward()
    torch.testing.assert_close(shared.grad, grads[0] + grads[1])
    assert embeds["text"].tokens.weight.grad is not None and embeds["image"].patch.weight.grad is not None
    assert layers[("feats", 1)].fc.weight.grad.abs().sum() > 0


def test_run_layers_recompute_keeps_only_layer_inputs_and_matches() -> None:
    torch.manual_seed(0)
    layers = [TransformerBlock(H, HEADS, 4 * H) for _ in range(3)]
    x = torch.randn(2, SEQ, H, requires_grad=True)

    def saved_and_grads(recompute: bool):
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run_layers(layers, x, {}, recompute)
        grads = torch.autograd.grad(out.square().sum(), [x, *layers[0].parameters()])
        return count, out, grads

    plain, recomputed = saved_and_grads(False), saved_and_grads(True)
    assert recomputed[0] < plain[0] / 4  # one saved input per layer instead of every intermediate
    torch.testing.assert_close(recomputed[1], plain[1])
    for a, b in zip(recomputed[2], plain[2]):
        torch.testing.assert_close(a, b)


def test_a_head_projects_leaves_of_other_widths_to_the_narrowest():
    from runtime.data import TaskBatch
    from runtime.heads import ClassifierHead

    torch.manual_seed(0)
    head = ClassifierHead("t", ["wide", "narrow"], {"wide": 32, "narrow": 16})
    assert list(head.project) == ["0"] and head.project["0"].weight.shape == (16, 32)
    assert head.norm.normalized_shape == (16,) and head.out.in_features == 16
    wide, narrow = torch.randn(4, 3, 32, requires_grad=True), torch.randn(4, 5, 16)
    loss = head({"wide": wide, "narrow": narrow}, TaskBatch({}, torch.tensor([0, 1, 2, 3]), 4)).sum()
    loss.backward()
    assert head.project["0"].weight.grad.abs().sum() > 0 and wide.grad.abs().sum() > 0
    same = ClassifierHead("t", ["a", "b"], {"a": 16, "b": 16})
    assert len(same.project) == 0  # equal widths: no projection, the same parameters as before


def test_a_packed_llama_row_equals_its_documents_alone():
    """Loom's llama: two documents packed into one row with their position and segment ids (what a packed data source
    gives, runtime.modules.row_kwargs) embed and attend as each document alone."""
    from runtime.modules import LlamaBlock

    torch.manual_seed(0)
    embed = build_embed(parse_job({
        "name": "p", "cluster": {"num_nodes": 1, "devices_per_node": 1, "device": "cpu"},
        "components": {"lm": {"kind": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 12,
                              "vocab_size": 20}},
        "tasks": [{"name": "t", "batch_size": 1, "loss": "lm", "components": [{"component": "lm"}]}],
    }), "lm")
    block = LlamaBlock(32, 4, 2, 64)
    a, b = torch.randint(0, 20, (1, 5)), torch.randint(0, 20, (1, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    segments = torch.tensor([[1] * 5 + [2] * 7])
    with torch.no_grad():
        packed = block(embed(torch.cat([a, b], dim=1), positions=positions), segments=segments)
        alone = torch.cat([block(embed(a)), block(embed(b))], dim=1)
    assert float((packed - alone).abs().max()) <= 1e-5
