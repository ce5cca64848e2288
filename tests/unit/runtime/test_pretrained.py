"""Pretrained Hugging Face components: shapes read from the config, the model's own modules, per-worker loading,
single-process training equal to the transformers model's, export round trip, and every bad folder refused in one
line."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from planner.errors import SpecError
from planner.metagraph import build_metagraph
from planner.spec import load_job
from runtime.data import synthetic_batch
from runtime.export import export_pretrained
from runtime.modules import build_layer
from runtime.reference import ReferenceTrainer

sys.path.insert(0, str(Path(__file__).parents[3] / "examples"))
from make_models import (  # noqa: E402  (examples/make_models.py)
    save_bert, save_clip_vision, save_llama, save_siglip_vision, save_text_tower)

RTOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_llama(root / "llama")
    save_llama(root / "qwen2", model_type="qwen2", seed=1)
    save_llama(root / "deep", num_hidden_layers=8, seed=2)
    save_clip_vision(root / "clip")
    save_bert(root / "bert")
    save_siglip_vision(root / "siglip")
    save_text_tower(root / "clip_text", "clip")
    save_text_tower(root / "siglip_text", "siglip")
    return root


def write_job(folder: Path, pretrained: str, steps: int = 3, **component) -> Path:
    """A one-task next-token job on a pretrained LM at ``pretrained`` (relative to ``folder``), plus a
    classification task sharing it."""
    doc = {
        "name": "hf", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"lm": {"pretrained": pretrained, "seq_len": 12, **component}},
        "tasks": [{"name": "caption", "batch_size": 4, "loss": "lm", "components": [{"component": "lm"}]}],
        "training": {"steps": steps, "lr": 1e-3, "precision": "fp32"},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def transformers_losses(job, folder: Path, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses of plain transformers training on the job's batches with the job's AdamW, and the gradients
    of its first step by checkpoint name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    train = job.training
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, eps=train.adam_eps)
    losses = []
    for step in range(steps):
        ids = synthetic_batch(job, 0, step, 0, job.tasks[0].batch_size).inputs["lm"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, grads


def test_the_spec_takes_its_shape_from_the_config(models, tmp_path):
    job = load_job(write_job(models, "llama"))
    comp = job.components["lm"]
    assert (comp.kind, comp.num_layers, comp.hidden_size, comp.num_heads, comp.num_kv_heads) == ("llama", 4, 64, 4, 2)
    assert (comp.ffn_hidden_size, comp.vocab_size) == (128, 128)
    assert comp.pretrained == str((models / "llama").resolve())  # relative to the spec file's folder
    assert build_metagraph(job).metaops[0].num_layers == 4


def test_a_restated_field_that_agrees_is_accepted_and_one_that_disagrees_names_both(models):
    assert load_job(write_job(models, "llama", hidden_size=64)).components["lm"].hidden_size == 64
    with pytest.raises(SpecError, match=r"components.lm: num_layers \(3\) contradicts .*config.json \(4\)"):
        load_job(write_job(models, "llama", num_layers=3))
    # a Llama runs tensor parallel on megatron-core (tests/integration/test_pretrained_tp.py); a BERT does not yet
    assert load_job(write_job(models, "llama", tensor_parallel=[1, 2])).components["lm"].tensor_parallel == [1, 2]
    with pytest.raises(SpecError, match=r"components.lm: tensor_parallel \(\[1, 2\]\): 'bert' .* data parallel only"):
        load_job(write_job(models, "bert", tensor_parallel=[1, 2]))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_single_process_training_equals_the_transformers_model(models, model_type):
    job = load_job(write_job(models, model_type))
    reference = ReferenceTrainer(job)
    want, hf_grads = transformers_losses(job, models / model_type, 3)
    for step in range(3):
        got = reference.train_step(step, keep_gradients=step == 0)["caption"]
        assert abs(got - want[step]) <= RTOL * want[step], (step, got, want[step])
        if step == 0:  # from equal weights (later, AdamW turns float-level differences of summation order into
            grads = reference.last_gradients  # visible ones; see tests/integration/_equivalence.py)
    from runtime.export import component_tensors

    ours = component_tensors(job, "lm", grads)
    assert set(ours) == set(hf_grads)
    for name, g in hf_grads.items():
        err = float((ours[name] - g).norm() / g.norm())
        assert err <= RTOL, (name, err)


def test_a_worker_reads_only_the_tensors_of_the_layers_it_holds(models, tensor_reads):
    job = load_job(write_job(models, "deep"))
    op = build_metagraph(job).metaops[0]
    read = tensor_reads
    layers = [build_layer(job, op, i) for i in (2, 3)]
    assert len(read) == 2 * 9  # q, k, v, o, gate, up, down and two norms per layer
    assert {name.split(".")[2] for name in read} == {"2", "3"}, read
    assert sum(p.numel() for m in layers for p in m.parameters()) == sum(
        p.numel() for n, p in _hf(models / "deep").named_parameters() if n.startswith(("model.layers.2.", "model.layers.3.")))


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_the_exported_model_loads_with_from_pretrained_and_gives_the_same_logits(models, tmp_path):
    job = load_job(write_job(models, "llama"))
    reference = ReferenceTrainer(job)
    reference.train_step(0)
    (folder,) = export_pretrained(job, reference.named_parameters(), tmp_path / "export")
    assert folder == tmp_path / "export" / "lm"
    batch = synthetic_batch(job, 0, 7, 0, 4)
    with torch.no_grad():
        logits = _hf(folder)(input_ids=batch.inputs["lm"]).logits
        head = reference.head(0)
        ours = head.out(head.norm(reference.forward(0, batch)["lm"]))
    assert float((logits - ours).norm() / ours.norm()) <= RTOL


@pytest.mark.parametrize("tower, tokens", [("clip", 17), ("siglip", 16)])
def test_a_vision_tower_feeding_the_llama_through_a_projector_equals_the_libraries_composed_by_hand(
        models, tmp_path, tower, tokens):
    """LLaVA's shape: CLIP's last hidden state (17 tokens with its class token, 32 wide; SigLIP's: 16, no class
    token), projected to the LM's 64 by Loom's connector, then 8 text tokens; the loss is next-token on the text.
    Composed here from CLIPVisionModel (SiglipVisionModel) and LlamaForCausalLM."""
    import transformers
    from transformers import AutoModelForCausalLM

    vision_class = getattr(transformers, {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[tower])
    path = write_job(models, "llama")
    doc = yaml.safe_load(path.read_text())
    doc["components"] = {"vision": {"pretrained": tower}, "lm": {"pretrained": "llama", "seq_len": tokens + 8}}
    doc["tasks"][0]["components"] = [{"component": "vision"}, {"component": "lm"}]
    path.write_text(yaml.safe_dump(doc))
    job = load_job(path)
    assert job.components["vision"].kind == "vit" and job.components["vision"].image_size == 16
    reference = ReferenceTrainer(job)
    batch = synthetic_batch(job, 0, 0, 0, 4)
    clip, llama = vision_class.from_pretrained(models / tower), AutoModelForCausalLM.from_pretrained(models / "llama")
    projector = reference.modules[("adapt:lm", 0)]
    with torch.no_grad():
        image = clip(pixel_values=batch.inputs["vision"]).last_hidden_state
        assert image.shape[1] == tokens
        ours = reference.modules[("embed:vision", 0)](batch.inputs["vision"])
        for layer in range(2):
            ours = reference.modules[("vision", layer)](ours)
        assert float((ours - image).norm() / image.norm()) <= RTOL
        text = batch.inputs["lm"]
        embeds = torch.cat([projector(image), llama.get_input_embeddings()(text)], dim=1)
        logits = llama(inputs_embeds=embeds).logits[:, image.shape[1] - 1:-1]
        want = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), text.reshape(-1)))
    got = reference.train_step(0)["caption"]
    assert abs(got - want) <= RTOL * want, (got, want)
    # both towers export to folders their classes load, holding the trained weights
    exported = {f.name: f for f in export_pretrained(job, reference.named_parameters(), tmp_path / "export")}
    assert set(exported) == {"vision", "lm"}
    with torch.no_grad():
        image = vision_class.from_pretrained(exported["vision"])(pixel_values=batch.inputs["vision"]).last_hidden_state
        ours = reference.modules[("embed:vision", 0)](batch.inputs["vision"])
        for layer in range(2):
            ours = reference.modules[("vision", layer)](ours)
    assert float((ours - image).norm() / image.norm()) <= RTOL


def test_a_bert_encoder_runs_its_own_layers_without_dropout(models):
    """BERT (the transformer kind): word, position and token-type embeddings and their LayerNorm, then its layers;
    the config's dropout is turned off, so Loom's tower equals BertModel in eval mode and training is deterministic."""
    from transformers import BertModel

    path = write_job(models, "bert")
    doc = yaml.safe_load(path.read_text())
    doc["components"] = {"enc": {"pretrained": "bert", "seq_len": 12}}
    doc["tasks"] = [{"name": "classify", "batch_size": 4, "loss": "cross_entropy", "components": [{"component": "enc"}]}]
    path.write_text(yaml.safe_dump(doc))
    job = load_job(path)
    assert (job.components["enc"].kind, job.components["enc"].vocab_size) == ("transformer", 100)
    reference = ReferenceTrainer(job)
    ids = synthetic_batch(job, 0, 0, 0, 4).inputs["enc"]
    with torch.no_grad():
        want = BertModel.from_pretrained(models / "bert").eval()(input_ids=ids).last_hidden_state
        got = reference.forward(0, synthetic_batch(job, 0, 0, 0, 4))["enc"]
    assert float((got - want).norm() / want.norm()) <= RTOL
    first, again = ReferenceTrainer(job).train_step(0), ReferenceTrainer(job).train_step(0)
    assert first == again


TOWERS = {"siglip": "SiglipVisionModel", "clip_text": "CLIPTextModel", "siglip_text": "SiglipTextModel"}


@pytest.mark.parametrize("tower", TOWERS)
def test_clip_and_siglip_towers_train_as_their_transformers_models(models, tower, tmp_path):
    """SigLIP's vision tower (no class token: (16/4)^2 = 16 positions, post_layernorm on every token), CLIP's text
    tower (causal, final_layer_norm) and SigLIP's (bidirectional, final_layer_norm): Loom's tower gives the model's
    last hidden state, and one training step's loss and gradient of every tensor equal the transformers model's
    feeding a copy of Loom's head; the export loads with the model's class and reproduces the trained tower."""
    import copy

    import transformers
    from runtime.export import component_tensors

    doc = yaml.safe_load(write_job(models, tower).read_text())
    doc["components"] = {"enc": {"pretrained": tower} | ({} if tower == "siglip" else {"seq_len": 12})}
    doc["tasks"] = [{"name": "classify", "batch_size": 4, "loss": "cross_entropy", "components": [{"component": "enc"}]}]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc).replace(f"pretrained: {tower}", f"pretrained: {models / tower}"))
    job = load_job(path)
    op = build_metagraph(job).metaops[0]
    reference = ReferenceTrainer(job)
    batch = synthetic_batch(job, 0, 0, 0, 4)
    cls = getattr(transformers, TOWERS[tower])
    model, head = cls.from_pretrained(models / tower), copy.deepcopy(reference.head(0))

    def tower_of(m, x):
        return (m(pixel_values=x) if tower == "siglip" else m(input_ids=x)).last_hidden_state

    x = batch.inputs["enc"]
    hidden = tower_of(model, x)
    assert hidden.shape[1] == (16 if tower == "siglip" else 12)
    with torch.no_grad():
        assert float((reference.forward(0, batch)["enc"] - hidden).norm() / hidden.norm()) <= RTOL
    want = head({"enc": hidden}, batch).sum() / 4
    want.backward()
    got = reference.train_step(0, keep_gradients=True)["classify"]
    want = float(want.detach())
    assert abs(got - want) <= RTOL * want, (got, want)
    ours = component_tensors(job, "enc", reference.last_gradients)
    trained = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(trained) == sum(1 for key in reference.last_gradients if key.startswith("enc/") or "embed:" in key)
    for name, g in trained.items():
        assert float((ours[name] - g).norm() / g.norm()) <= RTOL, name
    (folder,) = export_pretrained(job, reference.named_parameters(), tmp_path / "export")
    with torch.no_grad():
        exported = tower_of(cls.from_pretrained(folder), x)
        assert float((reference.forward(0, batch)["enc"] - exported).norm() / exported.norm()) <= RTOL
    assert op.num_layers == 2


def test_text_and_siglip_towers_refuse_positions_they_have_no_embedding_for(models, tmp_path):
    with pytest.raises(SpecError, match=r"seq_len \(17\): components.lm \(clip_text_model\) has learned positions "
                                        r"for 16 tokens"):
        load_job(write_job(models, "clip_text", seq_len=17))
    doc = yaml.safe_load(write_job(models, "siglip").read_text())
    doc["tasks"][0] |= {"loss": "cross_entropy", "components": [{"component": "lm", "image_size": 32}]}
    path = models / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"image_size \(32\): components.lm \(siglip_vision_model\) embeds 16 px"):
        load_job(path)


def _corrupt_shape(folder: Path) -> None:
    """Rewrite the safetensors header so one tensor claims another shape of the same size (64 = 8 x 8)."""
    file = folder / "model.safetensors"
    data = file.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["model.norm.weight"]["shape"] = [8, 8]
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])  # offsets count from the data's start


def _set_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breaks, expected", [
    (lambda f: None, ["nowhere", "no such folder"]),
    (lambda f: _set_config(f, model_type="gpt_neo"), ["config.json", "'gpt_neo' is not supported", "llama"]),
    (lambda f: _set_config(f, intermediate_size=None), ["config.json", "'intermediate_size' is missing"]),
    (lambda f: _set_config(f, intermediate_size=96), ["model.safetensors", "gate_proj", "[128, 64]", "[96, 64]"]),
    (_corrupt_shape, ["model.safetensors", "model.norm.weight", "[8, 8]", "[64]"]),
    (lambda f: (f / "model.safetensors").unlink(), ["no model.safetensors"]),
    (lambda f: (f / "config.json").write_text("{not json"), ["config.json", "not a model config (not JSON)"]),
], ids=["missing-folder", "unsupported", "missing-field", "config-contradicts-weights", "bad-shape", "no-weights",
        "bad-config"])
def test_a_bad_folder_is_one_error_line(models, tmp_path, breaks, expected):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(models / "llama", folder)
    breaks(folder)
    path = write_job(tmp_path, "nowhere" if expected[0] == "nowhere" else "model")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: components.lm: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_a_hand_edited_plan_with_tensor_parallel_on_bert_is_refused_before_anything_runs(models, tmp_path):
    """The spec refuses `tensor_parallel:` on a BERT (its layers are not mapped onto megatron-core); a plan edited by
    hand to run its layers at TP 2 is refused by `loom run --plan` in one line, before Ray starts."""
    from planner.api import plan_job

    doc = yaml.safe_load(write_job(models, "bert").read_text())
    doc["tasks"][0] |= {"loss": "cross_entropy"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc).replace("pretrained: bert", f"pretrained: {models / 'bert'}"))
    plan = plan_job(load_job(path), with_baselines=False).plan
    waves = [w.model_copy(update={"slices": [s.model_copy(update={"dp_degree": 1, "tp_degree": 2, "devices": [0, 1]})
                                             for s in w.slices]}) for w in plan.waves]
    (tmp_path / "plan.json").write_text(plan.model_copy(update={"waves": waves}).sealed().to_json())
    result = CliRunner().invoke(app, ["run", str(path), "--plan", str(tmp_path / "plan.json"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "has tensor_parallel 2, which components.lm does not allow (tensor_parallel [1]" \
        in lines[0], lines
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_use_beyond_the_models_position_table_is_one_error_line(models, tmp_path):
    path = write_job(models, "bert", seq_len=65)  # BERT's table has 64 positions
    with pytest.raises(SpecError, match=r"tasks\[0\].components\[0\].seq_len \(65\): components.lm \(bert\) has learned "
                                        r"positions for 64 tokens. Use seq_len <= 64."):
        load_job(path)
    doc = yaml.safe_load(write_job(models, "clip").read_text())
    doc["tasks"][0] |= {"loss": "cross_entropy", "components": [{"component": "lm", "image_size": 32}]}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"image_size \(32\): components.lm \(clip_vision_model\) embeds 16 px images"):
        load_job(path)


def test_a_packed_row_attends_within_its_documents(models):
    """Two documents packed into one row, with their position and segment ids, give each document's output alone."""
    job = load_job(write_job(models, "llama"))
    layer = build_layer(job, build_metagraph(job).metaops[0], 0)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 5, 64, generator=gen), torch.randn(1, 7, 64, generator=gen)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    segments = torch.tensor([[1] * 5 + [2] * 7])
    with torch.no_grad():
        packed = layer(torch.cat([a, b], dim=1), positions=positions, segments=segments)
        alone = torch.cat([layer(a), layer(b)], dim=1)
        unmasked = layer(torch.cat([a, b], dim=1))
    assert float((packed - alone).abs().max()) <= 1e-5
    assert float((unmasked - alone).abs().max()) > 1e-3  # without the ids the second document sees the first


def test_tied_embeddings_train_untied_and_export_untied(tmp_path):
    """A model whose LM head is its embedding (tie_word_embeddings, as small Qwen2 models): the head starts as the
    embedding's copy, the two train apart, and the export says so, so from_pretrained reproduces Loom's logits."""
    save_llama(tmp_path / "tied", tie_word_embeddings=True)
    job = load_job(write_job(tmp_path, "tied"))
    reference = ReferenceTrainer(job)
    head = reference.head(0)
    embed = reference.modules[("embed:lm", 0)]
    assert torch.equal(head.out.weight, embed.parts[0].weight) and head.out.weight is not embed.parts[0].weight
    reference.train_step(0)
    assert not torch.equal(head.out.weight, embed.parts[0].weight)
    (folder,) = export_pretrained(job, reference.named_parameters(), tmp_path / "export")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    batch = synthetic_batch(job, 0, 3, 0, 4)
    with torch.no_grad():
        logits = _hf(folder)(input_ids=batch.inputs["lm"]).logits
        ours = head.out(head.norm(reference.forward(0, batch)["lm"]))
    assert float((logits - ours).norm() / ours.norm()) <= RTOL
