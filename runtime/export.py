"""Export: a run's trained pretrained components written back in their source format.

For every component with ``pretrained: PATH``, :func:`export_pretrained` writes ``<out>/<component>/``: the trained
tensors merged from every rank (runtime.reference.merge_parameters) under the checkpoint's own names
(runtime.pretrained.export_name) in one ``model.safetensors``, next to a copy of the source folder's other files
(config, tokenizer, generation config), so ``AutoModelForCausalLM.from_pretrained(<out>/<component>)`` loads it. The
LM head and final norm come from the first next-token task that predicts through them (each such task trains its own
copy; docs/models.md), else from the first task that generates with the component (a GRPO task's head trains the
policy's LM head the rollouts decode with), else they are copied from the source. A tower's own pooling modules (CLIP's
post_layernorm, SigLIP's heads, BERT's pooler) come from the first pooled-loss task that pools with them
(runtime.pooling), else from the source. Tied embeddings are written untied
(``tie_word_embeddings: false``), since Loom trains the embedding and the head as two tensors.

A diffusers UNet2DConditionModel is written as diffusers writes it (``diffusion_pytorch_model.safetensors`` next to
the source's config, so ``UNet2DConditionModel.from_pretrained`` loads it); its conv_norm_out and conv_out come from
the first task that samples it with gradient (the output layer its samples are drawn through), else the first mse task
that denoises with it, else the first feedback task (runtime.unet_pretrained; every such head holds them as
``norm_out`` and ``conv_out``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from planner import unet_config
from planner.pretrained import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, resolve_pretrained, tensor_files, weights_file
from planner.spec import JobSpec
from runtime.heads import pretrained_lm
from runtime.pooling import pooler_export_name, pooling_task
from runtime.pretrained import export_name, head_export_name, is_diffusers_unet, read_tensors

EXPORT_DIR = "export"  # under a run's --out


def export_pretrained(job: JobSpec, params: dict[str, torch.Tensor], out_dir: str | Path) -> list[Path]:
    """Write every pretrained component of ``job`` from ``params`` (names as WaveWorker.named_parameters, merged over
    the ranks) into ``out_dir/<component>/``; returns the folders written (none when no component is pretrained)."""
    written = []
    for name, comp in job.components.items():
        if comp.pretrained:
            written.append(_export_component(job, name, params, Path(out_dir) / name))
    return written


def component_tensors(job: JobSpec, component: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained tensors of pretrained ``component`` under its checkpoint's names; tensors no parameter covers
    (an LM head no task trained) are read from the source folder."""
    comp = job.components[component]
    out = {}
    for key, tensor in params.items():
        group, layer, param = key.split("/", 2)
        target = export_name(comp, component, group, int(layer), param)
        if target is not None:
            out[target] = tensor
    head, head_name = _head_task(job, component)
    if head is not None:
        for key, tensor in params.items():
            group, _, param = key.split("/", 2)
            if group == f"head:{head}" and (target := head_name(param)) is not None:
                out[target] = tensor
    if (pooling := pooling_task(job, component)) is not None:  # the model's own pooler, trained by a pooled loss
        task, leaf = pooling
        for key, tensor in params.items():
            group, _, param = key.split("/", 2)
            if group == f"head:{task}" and (target := pooler_export_name(param, leaf)) is not None:
                out[target] = tensor
    source = comp.pretrained
    missing = sorted(set(tensor_files(Path(source))) - set(out))
    out |= read_tensors(source, missing)
    if resolve_pretrained(source).config.get("tie_word_embeddings") and "lm_head.weight" not in out \
            and "model.embed_tokens.weight" in out:  # a causal LM's (a BERT's config says tied too, it has no head)
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def _head_task(job: JobSpec, component: str):
    """(name of the task whose head predicts through pretrained ``component``'s output modules, the mapping of that
    head's parameter names to the checkpoint's); (None, None) when no task does."""
    comp = job.components[component]
    if is_diffusers_unet(comp):
        from runtime.unet_pretrained import head_export_name as unet_head_name

        # the task that samples the UNet with gradient trains the output layer its samples are drawn through
        sampled = next((t.name for t in job.tasks if any(u.component == component and u.mode == "sample"
                                                         and u.grad_last_step for u in t.components)), None)
        return sampled or next((t.name for loss in ("mse", "feedback") for t in job.tasks if t.loss == loss and any(
            u.component == component for u in t.components)), None), unet_head_name
    lm = next((t.name for i, t in enumerate(job.tasks)
               if t.loss in ("lm", "next_token") and pretrained_lm(job, i) is comp), None)
    if lm is not None:
        return lm, head_export_name
    # an RL task (runtime.grpo.GRPOHead, and a recipe's heads built on it) trains the LM head its rollouts decode with,
    # as its ``policy.*`` parameters: that head is the trained policy's
    rl = next((t.name for t in job.tasks if any(u.component == component and u.mode == "generate" and not comp.frozen
                                                for u in t.components)), None)
    if rl is None:
        return None, None
    return rl, lambda param: head_export_name(param.removeprefix("policy.")) if param.startswith("policy.") else None


def _export_component(job: JobSpec, component: str, params: dict[str, torch.Tensor], folder: Path) -> Path:
    from safetensors.torch import save_file

    source = Path(job.components[component].pretrained)
    tensors = component_tensors(job, component, params)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in source.iterdir():  # config, tokenizer, generation config: everything but the weights
        if path.is_file() and path.name not in (SINGLE_FILE, INDEX_FILE, unet_config.INDEX_FILE) \
                and not path.name.endswith(".safetensors"):
            shutil.copy2(path, tmp / path.name)
    if weights_file(source) == SINGLE_FILE:  # transformers: the head is written untied
        config = json.loads((source / CONFIG_FILE).read_text())
        config["tie_word_embeddings"] = False
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in sorted(tensors.items())}, str(tmp / weights_file(source)),
              metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
