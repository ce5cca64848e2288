"""``python -m bench.kernels.saved [--no-write]``: activation bytes one layer saves for backward, as the runtime runs it,
against what the planner predicts for that layer (planner.memory through the kind's layer segment), per
``training.kernels`` (off vs reference: the fused loom::rms_norm with the residual add and loom::swiglu) and
``training.precision`` (fp32, and bf16: float32 modules under autocast, as runtime.optim.autocast runs them).

Layers: Loom's llama kind (runtime.modules.LlamaBlock), a pretrained transformers Llama layer (runtime.pretrained),
Loom's vit kind (runtime.modules.TransformerBlock) and a pretrained CLIP vision layer; then, for the record, the
blocks of a small unet2d against planner.unet's older element counts (:func:`measure_unet`). Counted with
``torch.autograd.graph.saved_tensors_hooks`` during one forward: every tensor autograd keeps for backward, each
storage once, leaving out parameters and autocast's low-precision copies of them (parameter state: the planner counts
them in planner.costmodel.BYTES_COMPUTE_COPY). The planner's old figure (Korthikanti et al.'s
``s h (34 + 5 a s / h)`` at 2 bytes, which counts an attention-score matrix SDPA never keeps) is shown beside it.
No timing, so the machine's load does not matter. Writes bench/results/kernels-saved.{json,md}.
tests/unit/runtime/test_saved_activations.py runs the same comparison at tiny sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import write_results

MIB = 2**20
SHAPE = {"hidden": 1024, "ffn": 2816, "heads": 16, "kv_heads": 4, "seq": 512, "batch": 1, "image": 224, "patch": 14}
# views autocast's weight copies are saved through (a linear saves ``weight.t()`` of the cast)
_VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "UnsafeViewBackward0", "PermuteBackward0"}


def is_weight_copy(t: torch.Tensor, params: set[int]) -> bool:
    """Whether ``t`` is (a view of) autocast's low-precision copy of one of the parameters whose data pointers are
    ``params``: a ToCopy of that leaf (a cast of the layer's input, a leaf too, is an activation)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEWS:
        fn = fn.next_functions[0][0]
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    source = fn.next_functions[0][0]
    return type(source).__name__ == "AccumulateGrad" and source.variable.data_ptr() in params


def saved_bytes(module: torch.nn.Module, x: torch.Tensor, precision: str, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves in ``module(x, **kwargs)`` for backward: ``module`` float32, its
    forward under bf16 autocast when ``precision`` is ``bf16``; parameters and autocast's copies of them excluded."""
    params = {p.data_ptr() for p in module.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.numel() and t.data_ptr() not in params and not is_weight_copy(t, params):
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            module(x.clone().requires_grad_(True), **kwargs)
    return sum(seen.values())


def save_models(folder: Path, shape: dict) -> dict[str, Path]:
    """One-layer pretrained Llama and CLIP vision models of ``shape`` under ``folder`` (examples/make_models)."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    from make_models import save_clip_vision, save_llama

    s = shape
    return {
        "llama": save_llama(folder / "llama", num_hidden_layers=1, hidden_size=s["hidden"], intermediate_size=s["ffn"],
                            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                            max_position_embeddings=s["seq"]),
        "clip": save_clip_vision(folder / "clip", num_hidden_layers=1, hidden_size=s["hidden"],
                                 intermediate_size=4 * s["hidden"], num_attention_heads=s["heads"],
                                 image_size=s["image"], patch_size=s["patch"]),
    }


def components(models: dict[str, Path], shape: dict) -> dict[str, object]:
    """The planner's ComponentSpec of each measured layer, by row name."""
    from planner.spec import ComponentSpec

    s = shape
    own = dict(num_layers=1, hidden_size=s["hidden"], num_heads=s["heads"])
    return {
        "Loom llama kind": ComponentSpec(kind="llama", num_kv_heads=s["kv_heads"], ffn_hidden_size=s["ffn"], **own),
        "pretrained Llama (transformers)": ComponentSpec(pretrained=str(models["llama"])),
        "Loom vit kind": ComponentSpec(kind="vit", ffn_hidden_size=4 * s["hidden"], patch_size=s["patch"],
                                       image_size=s["image"], **own),
        "pretrained CLIP vision": ComponentSpec(pretrained=str(models["clip"])),
    }


def build(name: str, comp, kernels: str) -> torch.nn.Module:
    """The runtime's layer 0 of ``comp`` at ``kernels``, float32."""
    from planner.kinds import kind_of
    from runtime.modules import LlamaBlock, TransformerBlock
    from runtime.pretrained import build_layer

    torch.manual_seed(0)
    if comp.pretrained is not None:
        return build_layer(comp, 0, kernels)
    ffn = kind_of(comp).ffn_size(comp)
    if comp.kind == "llama":
        return LlamaBlock(comp.hidden_size, comp.num_heads, comp.num_kv_heads, ffn, kernels=kernels)
    return TransformerBlock(comp.hidden_size, comp.num_heads, ffn)


def seq_len(comp, seq: int) -> int:
    """Positions the layer sees: a vit's patches (and class token), else ``seq``."""
    from planner.kinds import kind_of
    from planner.spec import TaskComponentSpec

    use = TaskComponentSpec(component="c", seq_len=None if comp.kind == "vit" else seq)
    return kind_of(comp).shape(comp, "c", use, "use").seq_len


def planner_bytes(comp, seq: int, precision: str, kernels: str) -> float:
    """The planner's saved bytes of one layer and sample of ``comp`` over ``seq`` positions (its kind's segment)."""
    from planner.kinds import UseShape, kind_of
    from planner.memory import saved_mode

    shape = UseShape(seq, comp.image_size)
    return kind_of(comp).segments(comp, "c", shape, saved_mode(precision, kernels))[0].act_bytes


def korthikanti_bytes(comp, seq: int) -> float:
    """The planner's figure before planner.memory: ``s h (34 + 5 a s / h)`` bytes (bf16 activations)."""
    h = comp.hidden_size
    return seq * h * (34 + 5 * comp.num_heads * seq / h)


def measure(models: dict[str, Path], shape: dict, precisions=("fp32", "bf16"), batch: int = 1) -> list[dict]:
    """One record per (layer, precision, kernels): measured and predicted bytes for ``batch`` samples."""
    records = []
    for name, comp in components(models, shape).items():
        seq = seq_len(comp, shape["seq"])
        x = torch.randn(batch, seq, comp.hidden_size, generator=torch.Generator().manual_seed(0))
        for precision in precisions:
            for kernels in ("off", "reference"):
                measured = saved_bytes(build(name, comp, kernels), x, precision)
                predicted = batch * planner_bytes(comp, seq, precision, kernels)
                records.append({"layer": name, "precision": precision, "kernels": kernels, "positions": seq,
                                "batch": batch, "measured_bytes": measured, "planner_bytes": predicted,
                                "planner_over_measured": predicted / measured,
                                "before_bytes": batch * korthikanti_bytes(comp, seq) * (2 if precision == "fp32" else 1)})
    return records


UNET = {"hidden": 64, "channel_mults": [1, 2], "heads": 4, "image": 32, "batch": 2}


def measure_unet(precisions=("fp32", "bf16")) -> list[dict]:
    """Per planner segment of a small unet2d (no context), the mean saved bytes of its runtime blocks
    (runtime.unet.build_unet_layer) against the segment's ``act_bytes`` (planner.unet's element counts at the
    precision's bytes; not yet remodelled by planner.memory)."""
    from planner.kinds import UseShape, kind_of
    from planner.memory import saved_mode
    from planner.spec import ComponentSpec
    from planner.unet import unet_blocks
    from runtime.unet import build_unet_layer

    u, side = UNET, UNET["image"]
    comp = ComponentSpec(kind="unet2d", num_layers=1, hidden_size=u["hidden"], channel_mults=u["channel_mults"],
                         num_heads=u["heads"], in_channels=4, image_size=side)
    blocks = unet_blocks(comp, side)
    records = []
    for precision in precisions:
        segments = kind_of(comp).segments(comp, "u", UseShape(side * side, side), saved_mode(precision, "auto"))
        for index, segment in enumerate(segments):
            mine = [b for b in blocks if b.segment == index]
            measured = []
            for i in range(len(mine)):
                torch.manual_seed(0)
                layer = build_unet_layer(comp, "u", index, i, side, None)
                x = torch.randn(u["batch"], layer.layouts(side, 0)[0].numel)
                measured.append(saved_bytes(layer, x, precision, side=side, context_len=0) / u["batch"])
            mean = sum(measured) / len(measured)
            records.append({"layer": f"unet2d {segment.key}", "precision": precision, "kernels": "auto",
                            "positions": side * side, "batch": 1, "measured_bytes": mean,
                            "planner_bytes": segment.act_bytes, "planner_over_measured": segment.act_bytes / mean})
    return records


def report(records: list[dict]) -> str:
    s = SHAPE
    lines = ["# Activations one layer saves for backward: measured vs the planner", "",
             f"Llama layers: hidden {s['hidden']}, MLP {s['ffn']}, {s['heads']} heads over {s['kv_heads']} kv heads, "
             f"{s['seq']} positions. Vision layers: hidden {s['hidden']}, MLP {4 * s['hidden']}, {s['heads']} heads, "
             f"{s['image']} px images in {s['patch']} px patches. Batch {s['batch']}; one forward of the runtime's "
             "float32 layer (bf16: under autocast), saved tensors counted once per storage, parameters and their "
             "autocast copies excluded. **planner**: planner.memory through the kind's layer segment; **before**: the "
             "planner's figure before it (Korthikanti et al., with the attention-score matrix).", "",
             "| layer | precision | kernels | measured MiB | planner MiB | planner / measured | before MiB | "
             "before / measured |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    unet = [r for r in records if r["layer"].startswith("unet2d")]
    records = [r for r in records if r not in unet]
    for r in records:
        lines.append(f"| {r['layer']} | {r['precision']} | {r['kernels']} | {r['measured_bytes'] / MIB:.1f} | "
                     f"{r['planner_bytes'] / MIB:.1f} | {r['planner_over_measured']:.3f} | "
                     f"{r['before_bytes'] / MIB:.1f} | {r['before_bytes'] / r['measured_bytes']:.2f} |")
    saved = [(r, o) for r in records for o in records if r["kernels"] == "reference" and o["kernels"] == "off"
             and (r["layer"], r["precision"]) == (o["layer"], o["precision"]) and r["measured_bytes"] < o["measured_bytes"]]
    if saved:
        lines += ["", "Saved by the kernels (measured): " + "; ".join(
            f"{r['layer']} {r['precision']} {1 - r['measured_bytes'] / o['measured_bytes']:.0%}" for r, o in saved) + "."]
    worst = max(abs(r["planner_over_measured"] - 1) for r in records)
    lines += ["", f"Largest planner error on these layers: {worst:.1%} of the measured bytes."]
    if unet:
        lines += ["", f"unet2d (not yet remodelled: planner/unet.py's element counts, which still include attention "
                  f"scores that SDPA does not keep and leave out the input state its time-embedding view keeps alive): "
                  f"hidden {UNET['hidden']}, channel_mults {UNET['channel_mults']}, {UNET['heads']} heads, "
                  f"{UNET['image']} px latents, no context; per sample, the mean over each segment's blocks.", "",
                  "| segment | precision | measured MiB | planner MiB | planner / measured |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['layer'].removeprefix('unet2d ')} | {r['precision']} | {r['measured_bytes'] / MIB:.2f} | "
                  f"{r['planner_bytes'] / MIB:.2f} | {r['planner_over_measured']:.2f} |" for r in unet]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels.saved", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        records = measure(save_models(Path(tmp), SHAPE), SHAPE, batch=SHAPE["batch"]) + measure_unet()
    text = report(records)
    print(text)
    if not args.no_write:
        write_results("kernels-saved", records, text, {"shape": SHAPE, "unet": UNET})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
