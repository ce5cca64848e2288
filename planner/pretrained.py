"""Pretrained components, planner side: a component's kind and shape read from its local checkpoint folder.

A component with ``pretrained: PATH`` names a Hugging Face ``transformers`` folder (``config.json`` plus
``model.safetensors`` or ``model.safetensors.index.json`` and its shards) or a ``diffusers`` model folder (its config
names a ``_class_name`` instead of a ``model_type``; ``diffusion_pytorch_model.safetensors``): a UNet2DConditionModel,
read by planner.unet_config. :func:`resolve_pretrained` reads the
config's ``model_type``, finds its :class:`Architecture` in :data:`ARCHITECTURES` and returns the spec fields the
config fixes (kind, layers, widths, heads, MLP width, vocabulary); the spec need not restate them, and a restated
field that disagrees is an error naming both values. It also reads the safetensors headers (JSON, no tensor data)
and checks that the tensors the config implies are there with the shapes it implies, so a folder whose weights do
not match its config is refused at validation, not in a worker.

Adding an architecture: an :class:`Architecture` entry here (its kind and config keys, the tensors to check) and
its torch side in runtime.pretrained (docs/models.md). Pure Python (no torch): ``loom validate`` reads it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field as dataclass_field
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner import unet_config
from planner.jsonfile import JsonKind, read_json
from planner.spec import MAX_IMAGE_SIZE, MAX_LAYERS_PER_COMPONENT, MAX_LEVELS, MAX_SEQ_LEN, MAX_WIDTH

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is not one
MAX_JSON_BYTES = 16 * 2**20  # a config is a few KB, a shard index of the largest models a few MB
MAX_JSON_DEPTH = 32  # a config nests about 3 levels (rope_scaling, a tower's sub-config); json recurses per level
# the spec's limit (planner.spec, docs/job-spec.md "Limits") of each spec field a config fills; others: MAX_WIDTH
FIELD_LIMITS = {"num_layers": MAX_LAYERS_PER_COMPONENT, "image_size": MAX_IMAGE_SIZE, "patch_size": MAX_IMAGE_SIZE}
# config keys the tensor shapes read besides an architecture's fields, with their limits (absent: not used)
SHAPE_KEYS = {"head_dim": MAX_WIDTH, "max_position_embeddings": MAX_SEQ_LEN, "projection_size": MAX_WIDTH}


class PretrainedError(ValueError):
    """A pretrained folder that cannot be used; the message is one line naming the path and the fix."""


# a pretrained folder's JSON files, read by planner.jsonfile.read_json within these limits (read_folder_json)
CONFIG_JSON = JsonKind("model config", "not a model config", "the config.json save_pretrained writes",
                       "Re-save the model with save_pretrained", MAX_JSON_BYTES, MAX_JSON_DEPTH, PretrainedError)
INDEX_JSON = JsonKind("shard index", "not a shard index", "the index.json save_pretrained writes beside the shards",
                      "Re-save the model with save_pretrained", MAX_JSON_BYTES, MAX_JSON_DEPTH, PretrainedError)


Shapes = Callable[[dict[str, Any]], dict[str, tuple[int, ...]]]


def _llama_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors every Llama-family checkpoint holds, with the shapes its config implies."""
    h, f, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                   p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def _clip_vision_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors every CLIP vision tower holds (CLIPVisionModel), with the shapes its config implies: a class token,
    so (I/p)^2 + 1 positions."""
    h, p, c = cfg["hidden_size"], cfg["patch_size"], cfg.get("num_channels", 3)
    return {"embeddings.patch_embedding.weight": (h, c, p, p), "embeddings.class_embedding": (h,),
            "embeddings.position_embedding.weight": ((cfg["image_size"] // p) ** 2 + 1, h),
            "pre_layrnorm.weight": (h,), "post_layernorm.weight": (h,)} | _encoder_layer_tensors(cfg)


def _encoder_layer_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The encoder layers of a CLIP or SigLIP tower (vision or text): q/k/v/out projections, a two-layer MLP and two
    LayerNorms per layer."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layers.{i}."
        shapes |= {pre + f"self_attn.{x}_proj.weight": (h, h) for x in ("q", "k", "v", "out")}
        shapes |= {pre + "mlp.fc1.weight": (f, h), pre + "mlp.fc2.weight": (h, f), pre + "layer_norm1.weight": (h,),
                   pre + "layer_norm2.weight": (h,)}
    return shapes


def _siglip_vision_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors every SigLIP vision tower holds (SiglipVisionModel): no class token, so (I/p)^2 positions."""
    h, p, c = cfg["hidden_size"], cfg["patch_size"], cfg.get("num_channels", 3)
    return {"embeddings.patch_embedding.weight": (h, c, p, p),
            "embeddings.position_embedding.weight": ((cfg["image_size"] // p) ** 2, h),
            "post_layernorm.weight": (h,)} | _encoder_layer_tensors(cfg)


def _text_tower_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors every CLIP or SigLIP text tower holds (CLIPTextModel, SiglipTextModel; SigLIP's also its pooled
    output's ``head``)."""
    h = cfg["hidden_size"]
    shapes = {"embeddings.token_embedding.weight": (cfg["vocab_size"], h),
              "embeddings.position_embedding.weight": (cfg["max_position_embeddings"], h),
              "final_layer_norm.weight": (h,)} | _encoder_layer_tensors(cfg)
    if cfg.get("model_type") == "siglip_text_model":
        shapes["head.weight"] = (cfg.get("projection_size") or h, h)
    return shapes


def _bert_tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors every BERT encoder holds (BertModel), with the shapes its config implies."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
              "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
              "embeddings.LayerNorm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layer.{i}."
        shapes |= {pre + f"attention.self.{x}.weight": (h, h) for x in ("query", "key", "value")}
        shapes |= {pre + "attention.output.dense.weight": (h, h), pre + "intermediate.dense.weight": (f, h),
                   pre + "output.dense.weight": (h, f), pre + "attention.output.LayerNorm.weight": (h,),
                   pre + "output.LayerNorm.weight": (h,)}
    return shapes


@dataclass(frozen=True)
class Architecture:
    """How one ``model_type`` maps onto a Loom kind: which config key gives each spec field (a missing optional key
    leaves the field to the kind's default), and the tensors its checkpoint must hold."""

    kind: str
    fields: dict[str, str]  # spec field -> config key
    tensors: Shapes
    optional: tuple[str, ...] = ()  # config keys that may be absent
    max_positions: str | None = None  # config key of the longest sequence its learned position table covers
    fixed_image: bool = False  # its position table is for the config's image size only
    class_tokens: int = 0  # a vision tower's tokens before its patches (CLIP's class token; SigLIP has none)
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # spec fields computed from the config
    refuse: Callable[[dict[str, Any]], str | None] | None = None  # why a config cannot run exactly (None: it can)
    # config keys ``derive``, ``refuse`` and ``tensors`` read, each a number or a list of them (one per level), with
    # the limit of each number: checked first, so that none of them iterates over or divides by an unchecked size
    sizes: Mapping[str, int] = dataclass_field(default_factory=dict)
    levels: str | None = None  # a diffusers config's key with one entry per resolution level (check_config_levels)


_LLAMA_FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads", "ffn_hidden_size": "intermediate_size",
                 "vocab_size": "vocab_size"}

_VISION_FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                  "ffn_hidden_size": "intermediate_size", "patch_size": "patch_size", "image_size": "image_size",
                  "in_channels": "num_channels"}
_TEXT_FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size"}

# model_type -> architecture. Qwen2 adds q/k/v biases and Qwen3 q/k norms: checked by loading, not listed here.
ARCHITECTURES: dict[str, Architecture] = {
    **{name: Architecture("llama", _LLAMA_FIELDS, _llama_tensors, optional=("num_key_value_heads",))
       for name in ("llama", "qwen2", "qwen3", "mistral")},
    "clip_vision_model": Architecture("vit", _VISION_FIELDS, _clip_vision_tensors, optional=("num_channels",),
                                      fixed_image=True, class_tokens=1),
    "siglip_vision_model": Architecture("vit", _VISION_FIELDS, _siglip_vision_tensors, optional=("num_channels",),
                                        fixed_image=True),
    **{name: Architecture("transformer", _TEXT_FIELDS, _text_tower_tensors, max_positions="max_position_embeddings")
       for name in ("clip_text_model", "siglip_text_model")},
    "bert": Architecture("transformer", _TEXT_FIELDS, _bert_tensors, max_positions="max_position_embeddings"),
    # a diffusers folder names its class (config "_class_name"), not a model_type
    unet_config.CLASS_NAME: Architecture("unet2d", {}, unet_config.config_tensors, derive=unet_config.config_fields,
                                         refuse=unet_config.config_refusal, sizes=unet_config.SIZE_LIMITS,
                                         levels="block_out_channels"),
}


# recognised folders that are not components, and what to do with them instead
NOT_YET = {"AutoencoderKL": "a VAE is frozen and encodes a unet2d task's images into its latents on the data side; "
                            "Loom does not train it. Name the folder as the task's `data: {format: images, vae: "
                            "PATH}` instead of a component (docs/data.md)"}


@dataclass(frozen=True)
class PretrainedInfo:
    """What a pretrained folder fixes: the model type, the Loom kind and spec fields, and the config itself."""

    path: str
    model_type: str
    kind: str
    fields: dict[str, Any]  # spec field -> value (ints; a unet2d's channel_mults a list)
    config: dict[str, Any]


def resolve_path(value: str, base: Path | None) -> Path:
    """``value`` as an absolute path: relative paths are taken from ``base`` (the spec file's folder) or the cwd."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else (base or Path.cwd()) / path).resolve()


def resolve_pretrained(path: str | Path) -> PretrainedInfo:
    """Read ``path``'s config and safetensors headers; a PretrainedError (one line, naming the path) when the folder
    is missing, its architecture is not supported, or its tensors do not match its config."""
    return _resolve(str(Path(path).resolve()))


@lru_cache(maxsize=32)
def _resolve(path: str) -> PretrainedInfo:
    folder = Path(path)
    if folder.is_file():
        raise PretrainedError(f"{folder}: a file, not a folder. Point `pretrained:` at the saved model's folder "
                              "(the one holding config.json and model.safetensors).")
    if not folder.is_dir():
        raise PretrainedError(f"{folder}: no such folder. Point `pretrained:` at a saved model folder "
                              "(save_pretrained writes config.json and model.safetensors).")
    cfg = read_folder_json(folder / CONFIG_FILE, CONFIG_JSON)
    model_type = cfg.get("model_type") or cfg.get("_class_name")  # transformers' model_type, diffusers' class
    arch = ARCHITECTURES.get(model_type)
    if model_type in NOT_YET:
        raise PretrainedError(f"{folder / CONFIG_FILE}: '{model_type}' is not a component: {NOT_YET[model_type]}.")
    if arch is None:
        raise PretrainedError(f"{folder / CONFIG_FILE}: model_type '{model_type}' is not supported; supported: "
                              f"{', '.join(sorted(ARCHITECTURES))}. See docs/models.md for how to add one.")
    check_config_sizes(folder / CONFIG_FILE, cfg, arch.sizes)
    if arch.levels:
        check_config_levels(folder / CONFIG_FILE, cfg, arch.levels)
    reason = arch.refuse(cfg) if arch.refuse else None
    if reason:
        raise PretrainedError(f"{folder / CONFIG_FILE}: {reason}. Use a model whose config Loom runs exactly "
                              "(docs/models.md lists what is refused).")
    fields = arch.derive(cfg) if arch.derive else {}
    for field, key in arch.fields.items():
        if cfg.get(key) is None and key not in arch.optional:
            raise PretrainedError(f"{folder / CONFIG_FILE}: '{key}' is missing; a {model_type} config has it. "
                                  "Re-save the model with save_pretrained.")
        value = _config_size(folder / CONFIG_FILE, cfg, key, FIELD_LIMITS.get(field, MAX_WIDTH))
        if value is not None:
            fields[field] = value
    for key, limit in SHAPE_KEYS.items():
        _config_size(folder / CONFIG_FILE, cfg, key, limit)
    check_tensors(folder, arch.tensors(cfg))
    return PretrainedInfo(path, model_type, arch.kind, fields, cfg)


def _config_size(path: Path, cfg: dict[str, Any], key: str, limit: int) -> int | None:
    """Config ``key`` as a whole number in 1..``limit`` (the spec's limit of the field it fills: a config is input
    like a spec), None when absent; a PretrainedError naming the file and key otherwise."""
    value = cfg.get(key)
    return None if value is None else _whole(path, key, value, limit)


def check_config_sizes(path: Path, cfg: dict[str, Any], limits: Mapping[str, int]) -> None:
    """Each config key of ``limits``, a number or a list of them (one per level), each number as
    :func:`_config_size` checks it against the key's limit (absent keys pass)."""
    for key, limit in limits.items():
        value = cfg.get(key)
        for i, item in enumerate(value) if isinstance(value, list) else ():
            _whole(path, f"{key}[{i}]", item, limit)
        if not isinstance(value, list):
            _config_size(path, cfg, key, limit)


def check_config_levels(path: Path, cfg: dict[str, Any], key: str = "block_out_channels") -> None:
    """A diffusers config's ``key`` (one entry per resolution level: a UNet's, a VAE's) has at most MAX_LEVELS
    entries, the spec's limit of a unet2d's channel_mults; a PretrainedError naming the file and ``key`` otherwise
    (what the user's config has, not the spec field it fills)."""
    value = cfg.get(key)
    levels = len(value) if isinstance(value, list) else 0
    if levels > MAX_LEVELS:
        raise PretrainedError(f"{path}: {key} has {levels} levels, more than {MAX_LEVELS} (each halves the image side; "
                              f"images would be over {MAX_IMAGE_SIZE} pixels wide). Fix config.json, or re-save the "
                              "model with save_pretrained.")


def _whole(path: Path, name: str, value: Any, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise PretrainedError(f"{path}: {name} ({value!r}) is not a whole number in 1..{limit} (the limit that keeps "
                              "planning bounded, docs/job-spec.md \"Limits\"). Fix config.json, or re-save the model "
                              "with save_pretrained.")
    return value


def read_folder_json(path: Path, kind: JsonKind) -> dict[str, Any]:
    """A pretrained folder's JSON file as a mapping: read by planner.jsonfile.read_json (bounded size and nesting,
    UTF-8), one PretrainedError naming the file otherwise."""
    data = read_json(path, kind)
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: {kind.shape} (not a JSON object); expected {kind.expected}. {kind.fix}.")
    return data


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the shards an index names)."""
    if (folder / INDEX_FILE).is_file():
        index = read_folder_json(folder / INDEX_FILE, INDEX_JSON).get("weight_map")
        if not isinstance(index, dict):
            raise PretrainedError(f"{folder / INDEX_FILE}: no 'weight_map'. Re-save the model with save_pretrained.")
        return {name: folder / file for name, file in index.items()}
    if (folder / unet_config.INDEX_FILE).is_file() or (folder / unet_config.WEIGHTS_FILE).is_file():
        return _diffusers_tensor_files(folder)  # a diffusers model folder
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise PretrainedError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} ({unet_config.WEIGHTS_FILE} for a "
                              "diffusers model). Save the model with save_pretrained(..., safe_serialization=True).")
    return {name: single for name in read_header(single)}


def _diffusers_tensor_files(folder: Path) -> dict[str, Path]:
    if (folder / unet_config.INDEX_FILE).is_file():
        index = read_folder_json(folder / unet_config.INDEX_FILE, INDEX_JSON).get("weight_map")
        if not isinstance(index, dict):
            raise PretrainedError(f"{folder / unet_config.INDEX_FILE}: no 'weight_map'. Re-save the model with "
                                  "save_pretrained.")
        return {name: folder / file for name, file in index.items()}
    single = folder / unet_config.WEIGHTS_FILE
    return {name: single for name in read_header(single)}


def weights_file(folder: Path) -> str:
    """The single safetensors file name of ``folder``'s format: diffusers' for a diffusers model, else transformers'."""
    cfg = read_folder_json(folder / CONFIG_FILE, CONFIG_JSON)
    return unet_config.WEIGHTS_FILE if cfg.get("_class_name") and not cfg.get("model_type") else SINGLE_FILE


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header (name -> dtype, shape, offsets); reads no tensor data."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise PretrainedError(f"{path}: not a safetensors file ({exc}). Re-save the model with save_pretrained.") from None
    return {k: v for k, v in header.items() if k != "__metadata__"}


def check_tensors(folder: Path, want: dict[str, tuple[int, ...]]) -> None:
    files = tensor_files(folder)
    headers = {file: read_header(file) for file in set(files.values()) if file.is_file()}
    for name, shape in want.items():
        file = files.get(name)
        if file is None or name not in headers.get(file, {}):
            raise PretrainedError(f"{folder}: tensor '{name}' is missing from the safetensors files; the config implies "
                                  "it. Re-save the model, or fix config.json.")
        got = tuple(headers[file][name]["shape"])
        if got != shape:
            raise PretrainedError(f"{file}: tensor '{name}' has shape {list(got)} but config.json implies {list(shape)}. "
                                  "The weights do not belong to this config.")


TENSOR_PARALLEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")  # runtime.megatron_pretrained maps their layers


def tensor_parallel_refusal(model_type: str, cfg: dict[str, Any]) -> str | None:
    """Why a pretrained ``model_type`` with config ``cfg`` cannot run tensor parallel on megatron-core's local layer
    (runtime.megatron_pretrained), or None when it can: Llama-family layers with plain RoPE, SiLU and no biases but
    Qwen2's q/k/v ones."""
    if model_type not in TENSOR_PARALLEL_TYPES:
        return (f"'{model_type}' layers are not mapped onto megatron-core's (only {', '.join(TENSOR_PARALLEL_TYPES)} "
                "are)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    act = cfg.get("hidden_act", "silu")
    problems = [what for what, bad in (
        (f"rope_type '{rope_type}' (megatron's RotaryEmbedding runs plain RoPE)", rope_type != "default"),
        ("attention_bias (an o_proj bias)", model_type != "qwen2" and cfg.get("attention_bias")),
        ("mlp_bias", cfg.get("mlp_bias")),
        (f"hidden_act '{act}' (megatron's gated unit runs SiLU)", act != "silu"),
    ) if bad]
    if not problems:
        return None
    return f"its config has {' and '.join(problems)}, which megatron-core's local layer cannot express"


def fill_component(data: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """A component's raw spec with the fields its pretrained folder fixes filled in and ``pretrained`` made absolute;
    a PretrainedError when the spec restates a field with another value (naming both)."""
    info = resolve_pretrained(resolve_path(str(data["pretrained"]), base))
    refusal = tensor_parallel_refusal(info.model_type, info.config)
    if refusal and any(degree != 1 for degree in data.get("tensor_parallel") or [1]):
        raise PretrainedError(f"tensor_parallel ({data['tensor_parallel']}): {refusal}, so this component trains data "
                              "parallel only. Remove `tensor_parallel:` (docs/models.md says what runs tensor "
                              "parallel).")
    out = {**data, "pretrained": info.path}
    for field, value in {"kind": info.kind, **info.fields}.items():
        given = data.get(field)
        if given is not None and given != value:
            raise PretrainedError(f"{field} ({given!r}) contradicts {info.path}/{CONFIG_FILE} ({value!r}). Remove "
                                  f"`{field}:` from the component: a pretrained component takes it from its config.")
        out[field] = value
    return out


def class_tokens(path: str) -> int:
    """The tokens pretrained vision tower ``path`` puts before its patches: 1 for CLIP's class token, 0 for SigLIP."""
    return ARCHITECTURES[resolve_pretrained(path).model_type].class_tokens


def check_use(comp_name: str, path: str, where: str, seq_len: int | None, image_size: int | None) -> None:
    """A PretrainedError when a use of pretrained ``comp_name`` (spec path ``where``) asks for positions its model
    has no embedding for: a longer sequence than a learned position table, another image size than a vision
    tower's."""
    info = resolve_pretrained(path)
    arch = ARCHITECTURES[info.model_type]
    limit = info.config.get(arch.max_positions) if arch.max_positions else None
    if limit is not None and seq_len is not None and seq_len > limit:
        raise PretrainedError(f"{where}.seq_len ({seq_len}): components.{comp_name} ({info.model_type}) has learned "
                              f"positions for {limit} tokens. Use seq_len <= {limit}.")
    side = info.config.get("image_size")
    if arch.fixed_image and image_size is not None and image_size != side:
        raise PretrainedError(f"{where}.image_size ({image_size}): components.{comp_name} ({info.model_type}) embeds "
                              f"{side} px images only (its position table). Leave image_size unset or set {side}.")
