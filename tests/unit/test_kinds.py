"""The component-kind registries: planner.kinds (fields, shape, costs, properties) and runtime.kinds (torch builders)
name the same kinds, every entry has every entry field, and no module outside them compares kind names."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from planner.kinds import KINDS, KindSpec
from planner.spec import ComponentSpec, parse_job
from runtime.kinds import RUNTIME_KINDS, RuntimeKind, runtime_kind
from runtime.megatron_backend import PARAM_MAPS

ROOT = Path(__file__).resolve().parents[2]
ROOT_INPUTS = ("tokens", "image", "latents", "features")  # what runtime.data draws
KIND_NAMES = ("transformer", "vit", "llama", "decoder", "mlp", "unet2d")

# one small component per kind, with a use it can run as a root (a decoder attends to cross_seq_len there)
SMALL = {
    "transformer": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 4},
    "vit": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "image_size": 8, "patch_size": 4},
    "llama": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1, "seq_len": 4},
    "decoder": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "seq_len": 4, "cross_seq_len": 3},
    "mlp": {"num_layers": 1, "hidden_size": 16},
    "unet2d": {"num_layers": 1, "hidden_size": 8, "image_size": 8, "channel_mults": [1, 2]},
}


def test_planner_and_runtime_registries_name_the_same_kinds_in_the_same_order():
    assert tuple(KINDS) == tuple(RUNTIME_KINDS) == KIND_NAMES
    assert all(KINDS[name].name == name and RUNTIME_KINDS[name].name == name for name in KINDS)
    assert set(SMALL) == set(KINDS), "add a small component of the new kind to SMALL"


@pytest.mark.parametrize("name", KIND_NAMES)
def test_every_kind_has_every_entry(name):
    kind, entry = KINDS[name], RUNTIME_KINDS[name]
    assert isinstance(kind, KindSpec) and isinstance(entry, RuntimeKind)
    assert callable(kind.segments) and callable(kind.shape)
    assert set(kind.requires) <= set(ComponentSpec.model_fields), kind.requires
    assert kind.root_input in ROOT_INPUTS
    assert (kind.in_channels is not None) == (kind.root_input in ("image", "latents"))
    assert kind.tp_variant is None or kind.tp_variant in PARAM_MAPS  # megatron-core runs that variant
    assert (kind.ffn_size is not None) >= (kind.tp_variant is not None)  # a tensor-parallel block has an MLP width
    assert not (kind.bridge and kind.text_tokens)  # text tokens come through a connector, which bridges skip
    assert not (kind.memory and kind.context)
    for f in fields(RuntimeKind):
        assert f.name == "name" or callable(getattr(entry, f.name)), f.name


def test_the_component_spec_describes_every_kind():
    described = ComponentSpec.model_fields["kind"].description
    assert all(name in described for name in KINDS), described


@pytest.mark.parametrize("name", KIND_NAMES)
def test_every_kind_plans_and_builds_its_layers_and_input_module(name):
    from planner.metagraph import build_metagraph
    from runtime.embeddings import build_embed
    from runtime.modules import build_layer

    components = {"c": {"kind": name, **SMALL[name]}}
    uses = [{"component": "c"}]
    if KINDS[name].memory:  # it attends to another use's output
        components["enc"] = {"kind": "transformer", **SMALL["transformer"]}
        uses.insert(0, {"component": "enc"})
    job = parse_job({"name": "j", "components": components,
                     "tasks": [{"name": "t", "batch_size": 2, "components": uses}]})
    graph = build_metagraph(job)
    ops = [op for op in graph.metaops if op.component == "c"]
    assert {op.kind for op in ops} == {name}
    assert build_layer(job, ops[0], 0) is not None
    assert build_embed(job, "c") is not None


def test_a_kind_the_runtime_does_not_build_is_refused_by_name(monkeypatch):
    monkeypatch.delitem(RUNTIME_KINDS, "mlp")
    comp = ComponentSpec(kind="mlp", num_layers=1, hidden_size=4)
    with pytest.raises(NotImplementedError, match="components.m: kind 'mlp' is planned but the runtime does not run"):
        runtime_kind(comp, "m")


@pytest.mark.parametrize("package", ["planner", "runtime"])
def test_no_module_outside_the_registries_compares_kind_names(package):
    hits = []
    for path in sorted((ROOT / package).glob("*.py")):
        if path.name == "kinds.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(f'"{name}"' in line or f"'{name}'" in line for name in KIND_NAMES) and "kind" in line:
                hits.append(f"{path.name}:{n}: {line.strip()}")
    assert not hits, "ask the kind's registry entry instead:\n" + "\n".join(hits)
