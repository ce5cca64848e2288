"""``python -m bench.kernels.saved [--no-write]``: activation bytes one Llama layer saves for backward, with
``training.kernels: off`` (transformers' LlamaRMSNorm and LlamaMLP, Loom's llama kind with nn.RMSNorm and F.silu)
against ``reference`` (the fused loom::rms_norm with the residual add, loom::swiglu), next to the planner's
per-layer figure for the same layer (planner.kinds: Korthikanti et al.'s ``s h (34 + 5 a s / h)``, bf16).

Counted with ``torch.autograd.graph.saved_tensors_hooks`` during one forward: every tensor autograd keeps for
backward, each storage once, parameters left out (they are state, not activations). No timing, so the machine's load
does not matter. Writes bench/results/kernels-saved.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import write_results

MIB = 2**20
SHAPE = {"hidden": 1024, "ffn": 2816, "heads": 16, "kv_heads": 4, "seq": 512, "batch": 1}


def saved_bytes(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in ``module(x)``, module and input in ``dtype``
    (bf16 weights and activations, what the planner's figure assumes; under autocast the weights' bf16 copies would
    count as saved tensors too)."""
    module, x = module.to(dtype), x.to(dtype)
    params = {p.data_ptr() for p in module.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in params and t.numel():
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.clone().requires_grad_(True))
    return sum(seen.values())


def layers(folder: Path, kernels: str) -> dict[str, torch.nn.Module]:
    """The pretrained layer of the Llama at ``folder`` and Loom's own llama layer of the same shape, at ``kernels``."""
    from planner.spec import ComponentSpec
    from runtime.modules import LlamaBlock
    from runtime.pretrained import build_layer

    comp = ComponentSpec(kind="llama", pretrained=str(folder), num_layers=1, hidden_size=SHAPE["hidden"],
                         num_heads=SHAPE["heads"], num_kv_heads=SHAPE["kv_heads"], ffn_hidden_size=SHAPE["ffn"],
                         vocab_size=128, seq_len=SHAPE["seq"])
    torch.manual_seed(0)
    own = LlamaBlock(SHAPE["hidden"], SHAPE["heads"], SHAPE["kv_heads"], SHAPE["ffn"], kernels=kernels)
    return {"pretrained (transformers)": build_layer(comp, 0, kernels), "Loom llama kind": own}


def planner_bytes() -> float:
    """The planner's saved-activation bytes for one such layer and sample (bf16)."""
    from planner.kinds import _transformer_layer

    h, kv = SHAPE["hidden"], SHAPE["hidden"] * SHAPE["kv_heads"] // SHAPE["heads"]
    return _transformer_layer("llama", h, SHAPE["ffn"], SHAPE["seq"], SHAPE["heads"], gated=True, kv_dim=kv)[3]


def measure() -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    from make_models import save_llama

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_llama(Path(tmp) / "llama", num_hidden_layers=1, hidden_size=SHAPE["hidden"],
                            intermediate_size=SHAPE["ffn"], num_attention_heads=SHAPE["heads"],
                            num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=SHAPE["seq"])
        x = torch.randn(SHAPE["batch"], SHAPE["seq"], SHAPE["hidden"], generator=torch.Generator().manual_seed(0))
        for dtype in (torch.float32, torch.bfloat16):
            by_mode = {mode: layers(folder, mode) for mode in ("off", "reference")}
            for name in by_mode["off"]:
                off, ref = (saved_bytes(by_mode[m][name], x, dtype) for m in ("off", "reference"))
                records.append({"layer": name, "dtype": str(dtype).removeprefix("torch."), "off_bytes": off,
                                "reference_bytes": ref, "saved_fraction": 1 - ref / off,
                                "planner_bytes": planner_bytes() * SHAPE["batch"]})
    return records


def report(records: list[dict]) -> str:
    s = SHAPE
    lines = ["# Activations one Llama layer saves for backward: kernels off vs on", "",
             f"Layer: hidden {s['hidden']}, MLP {s['ffn']}, {s['heads']} heads over {s['kv_heads']} kv heads, "
             f"{s['seq']} positions, batch {s['batch']}; one forward, saved tensors counted once each, parameters "
             "excluded. Planner: its per-layer figure for the same layer (bf16, planner.kinds), which does not depend "
             "on training.kernels.", "",
             "| layer | dtype | off MiB | kernels MiB | saved by the kernels | planner MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['layer']} | {r['dtype']} | {r['off_bytes'] / MIB:.1f} | {r['reference_bytes'] / MIB:.1f} "
                     f"| {r['saved_fraction']:.0%} | {r['planner_bytes'] / MIB:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels.saved", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    records = measure()
    text = report(records)
    print(text)
    if not args.no_write:
        write_results("kernels-saved", records, text, {"shape": SHAPE})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
