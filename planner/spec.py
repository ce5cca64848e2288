"""Job specs: what a user declares (cluster, components, tasks, training), validated by pydantic.

Every model forbids unknown keys. :func:`load_job` turns any validation failure into one
:class:`~planner.errors.SpecError` whose message names the field path, the value, what was
expected and, for a misspelt key or name, the closest valid one.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from planner.data_spec import DataSpec
from planner.errors import SpecError, did_you_mean
from planner.spec_file import read_job_document


UseMode = Literal["train", "forward", "generate", "sample"]
MIN_MEMORY_GIB = 2**-10  # cluster.memory_gib: 1 MiB; below it no layer fits and memory ratios lose their meaning


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field annotated ``annotation`` takes a value of one of ``kinds`` (directly or as a union member)."""
    if annotation in kinds:
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _admits(typing.get_args(annotation)[0], kinds)
    if origin in (Union, types.UnionType):
        return any(_admits(a, kinds) for a in typing.get_args(annotation))
    return origin is Literal and any(isinstance(a, kinds) for a in typing.get_args(annotation))


def _boolean_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` puts a boolean (YAML's true/false) where ``annotation`` wants a number: pydantic's lax mode
    would read it as 1 or 0 (``num_layers: true`` was one layer). Also the elements of a list of numbers."""
    if isinstance(value, bool):
        return _admits(annotation, (int, float)) and not _admits(annotation, (bool,))
    if isinstance(value, list) and any(isinstance(v, bool) for v in value):
        union = typing.get_origin(annotation) in (Union, types.UnionType)
        members = typing.get_args(annotation) if union else (annotation,)
        elements = [typing.get_args(m)[0] for m in members
                    if typing.get_origin(m) in (list, tuple) and typing.get_args(m)]
        return any(_admits(e, (int, float)) and not _admits(e, (bool,)) for e in elements)
    return False


class StrictModel(BaseModel):
    """Base of every spec model: unknown keys are errors, values are immutable, every float is finite (no inf or
    NaN, nor a string or YAML value that parses to one: `.inf`, `1e999`), whichever field it is, and no number is a
    boolean."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _boolean_for_number(field.annotation, value):
            if isinstance(value, bool):
                raise ValueError(f"{str(value).lower()} is a boolean where a number is expected; write the number")
            raise ValueError("the list holds true or false where numbers are expected; write the numbers")
        return value


class ClusterSpec(StrictModel):
    """The devices a job may use."""

    num_nodes: int = Field(1, ge=1, description="Number of nodes (machines).")
    devices_per_node: int = Field(8, ge=1, description="Accelerators (or CPU workers) per node.")
    device: str = Field("a800", description="Device kind, a key of the device table: a100, a800, h100, h200, cpu.")
    memory_gib: float | None = Field(
        None, ge=MIN_MEMORY_GIB, description="Usable memory per device in GiB; defaults to the device table's value."
    )
    intra_node_gbps: float | None = Field(
        None, gt=0, description="Per-device bandwidth inside a node in Gbit/s (NVLink); defaults to the device table's."
    )
    inter_node_gbps: float = Field(400.0, gt=0, description="Per-node network bandwidth between nodes in Gbit/s.")

    @property
    def num_devices(self) -> int:
        """Total number of devices N."""
        return self.num_nodes * self.devices_per_node


class ComponentSpec(StrictModel):
    """A model component (a registry kind plus its shape). Which fields a kind needs is checked by the registry."""

    kind: str = Field(description="Registry name: transformer, vit, llama, decoder, unet2d, mlp.")
    num_layers: int = Field(ge=1, description="Number of repeated layers (blocks).")
    hidden_size: int = Field(ge=1, description="Hidden (model) width; for unet2d the base channel count.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads (transformer kinds).")
    num_kv_heads: int | None = Field(None, ge=1, description="Key/value heads for grouped-query attention (llama).")
    ffn_hidden_size: int | None = Field(None, ge=1, description="MLP width; defaults to 4*hidden (8/3*hidden for llama).")
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size of a token-input component (informational).")
    seq_len: int | None = Field(None, ge=1, description="Default sequence length; a task may override it.")
    image_size: int | None = Field(None, ge=1, description="Default image (or latent) side in pixels for vit/unet2d.")
    patch_size: int | None = Field(None, ge=1, description="ViT patch side in pixels.")
    in_channels: int | None = Field(None, ge=1, description="Input channels (vit, unet2d).")
    cross_seq_len: int | None = Field(None, ge=1, description="Length of the sequence a decoder cross-attends to.")
    channel_mults: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="unet2d: channel multiplier per resolution level (1 to MAX_LEVELS levels: each "
        "halves the image; docs/job-spec.md, Limits); left out, [1, 2, 4, 4].")
    out_features: int | None = Field(None, ge=1, description="mlp: output width (classes, embedding size).")
    pretrained: str | None = Field(
        None,
        description="A local checkpoint folder (Hugging Face transformers: config.json + safetensors; or a diffusers "
        "model folder). The component's shape fields are read from its config; see docs/models.md.",
    )
    lr: float | None = Field(
        None, gt=0, description="Learning rate of this component's parameters (absolute, scheduled like training.lr); "
        "none: training.lr."
    )
    frozen: bool = Field(False, description="Forward only: no weight gradients and no optimizer state.")
    recompute: bool = Field(
        False, description="Activation checkpointing: keep only each layer's input, recompute the rest in backward."
    )
    tensor_parallel: list[int] = Field(
        default_factory=lambda: [1], min_length=1,
        description="Tensor-parallel degrees the planner may choose from (1 = data parallel only).",
    )
    weights_from: str | None = Field(
        None, description="Another component whose trained weights this one receives after every step (a weight "
        "hand-off, e.g. a generation copy of a policy laid out differently); same shape required. None: its own."
    )
    init_from: str | None = Field(
        None, description="A Loom model file this component starts from instead of its seeded initialisation: a "
        "run's model.pt, or a folder with one up to two levels above (a trained phase's '@<phase>/checkpoint'), "
        "holding this component's parameters under the same names (a run of a job with this component). Relative to "
        "the spec's folder. Loom's own kinds only: a pretrained component starts from its folder."
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_init_from(cls, data: Any, info: ValidationInfo) -> Any:
        """A relative ``init_from`` is read from the spec file's folder (the validation context's ``base``); a phase
        reference is left to the pipeline (planner.pipeline.resolve_references)."""
        if isinstance(data, dict) and isinstance(data.get("init_from"), str) and data["init_from"] \
                and not data["init_from"].startswith("@"):
            base = Path((info.context or {}).get("base") or Path.cwd())
            data = {**data, "init_from": str((base / Path(data["init_from"]).expanduser()).absolute())}
        return data

    @model_validator(mode="after")
    def _init_from_own_kinds(self) -> ComponentSpec:
        if self.init_from is not None and self.pretrained is not None:
            raise ValueError(f"init_from ({self.init_from}) is for Loom's own kinds; this component is pretrained "
                             f"({self.pretrained}) and starts from its folder. Remove one of them.")
        return self

    @model_validator(mode="before")
    @classmethod
    def _read_pretrained(cls, data: Any, info: ValidationInfo) -> Any:
        """A pretrained component takes its kind and shape from its folder's config (planner.pretrained); relative
        paths are read from the spec file's folder (the validation context's ``base``)."""
        if not isinstance(data, dict) or data.get("pretrained") is None:
            return data
        from planner.pretrained import fill_component  # local: it is only needed by pretrained components

        return fill_component(data, (info.context or {}).get("base"))


class TaskComponentSpec(StrictModel):
    """One use of a component inside a task, with the data shape it sees there."""

    component: str = Field(description="Name of a key under `components`.")
    name: str | None = Field(None, description="Name of this use inside the task (default: the component name).")
    after: list[str] | None = Field(
        None,
        description="Names of earlier uses in this task whose outputs feed this one. "
        "Default: the previous entry (a chain); [] for an independent branch.",
    )
    seq_len: int | None = Field(None, ge=1, description="Sequence length seen here (overrides the component's).")
    image_size: int | None = Field(None, ge=1, description="Image side seen here (overrides the component's).")
    mode: UseMode = Field(
        "train", description="What this use runs (docs/job-spec.md, Modes): train = forward and backward (weights "
        "train unless the component is frozen); forward = forward only, no weight gradients (a frozen scorer or "
        "reference; gradients still pass through it to earlier trained uses); generate = autoregressive decoding "
        "without gradient (prefill, then `new_tokens` tokens with a KV cache); sample = `denoise_steps` diffusion "
        "denoising steps without gradient (the last with gradient when `grad_last_step`). The outputs of generate "
        "and sample uses are samples: no gradient flows back through them."
    )
    new_tokens: int | None = Field(None, ge=1, description="generate: tokens decoded after the prompt (`seq_len`).")
    samples: int = Field(
        1, ge=1, description="generate/sample: samples drawn per input row (e.g. a GRPO group); the task's "
        "batch_size counts samples, so it must be a multiple of this."
    )
    temperature: float = Field(1.0, ge=0, description="generate: sampling temperature (0 = greedy).")
    denoise_steps: int | None = Field(None, ge=1, description="sample: denoising steps run from noise.")
    grad_last_step: bool = Field(
        False, description="sample: run the last denoising step with gradient (its output carries gradient)."
    )
    stop_steps: tuple[int, int] | None = Field(
        None, description="sample with grad_last_step: [first, last] step indices (0-based, within denoise_steps) "
        "the step with gradient is drawn from, seeded per training step (default: the late quarter, IterComp's "
        "[30, 39] of 40); steps after it do not run."
    )
    scheduler: Literal["ddpm", "ddim"] = Field("ddpm", description="sample: the diffusers scheduler denoising runs.")

    @property
    def stop_range(self) -> tuple[int, int]:
        """The seeded stop range of a sample use: ``stop_steps``, else the last quarter of ``denoise_steps``."""
        steps = self.denoise_steps or 1
        return tuple(self.stop_steps) if self.stop_steps is not None else (steps - max(1, steps // 4), steps - 1)

    @property
    def denoise_passes(self) -> int:
        """Denoiser forwards a sample use runs at most: up to the stop range's last step and the step with gradient
        (``stop + 1``, priced at the range's last) with ``grad_last_step``, else all ``denoise_steps``."""
        return self.stop_range[1] + 1 if self.grad_last_step else self.denoise_steps or 0

    @property
    def use_name(self) -> str:
        return self.name or self.component

    @property
    def detached(self) -> bool:
        """Whether this use's output carries no gradient (a generate use; a sample use without grad_last_step)."""
        return self.mode == "generate" or (self.mode == "sample" and not self.grad_last_step)

    @model_validator(mode="after")
    def _check_mode(self) -> TaskComponentSpec:
        """Each mode's own fields are given with it and only with it (a field at its default counts as not given, so
        a dumped spec validates again)."""
        needs = {"generate": "new_tokens", "sample": "denoise_steps"}
        if self.mode in needs and getattr(self, needs[self.mode]) is None:
            raise ValueError(f"mode '{self.mode}' of use '{self.use_name}' needs `{needs[self.mode]}`; add it.")
        only = {"new_tokens": ("generate",), "temperature": ("generate",), "denoise_steps": ("sample",),
                "grad_last_step": ("sample",), "samples": ("generate", "sample"), "stop_steps": ("sample",),
                "scheduler": ("sample",)}
        for name, modes in only.items():
            if getattr(self, name) != type(self).model_fields[name].default and self.mode not in modes:
                raise ValueError(f"`{name}` of use '{self.use_name}' applies only to mode "
                                 f"{' or '.join(modes)} (this use is mode '{self.mode}'); remove it.")
        if self.stop_steps is not None:
            first, last = self.stop_steps
            if not self.grad_last_step:
                raise ValueError(f"`stop_steps` of use '{self.use_name}' applies only with grad_last_step: true; "
                                 "remove it or add grad_last_step.")
            if not 0 <= first <= last < self.denoise_steps:
                raise ValueError(f"`stop_steps` of use '{self.use_name}' ({[first, last]}) is not a range of step "
                                 f"indices within 0..{self.denoise_steps - 1}; give [first, last] with "
                                 "0 <= first <= last < denoise_steps (IterComp: [30, 39] of 40).")
        return self


class ScorerSpec(StrictModel):
    """One frozen reward model of a ``feedback`` task (runtime.feedback): ``linear``, a random linear reward of the
    decoded image (seeded; for smoke runs, an optimum the generator can reach), or a kind a recipe registers
    (runtime.feedback.register_scorer) with its ``args``."""

    kind: str = Field("linear", description="Scorer kind: linear (runtime.feedback.LinearScorer) or one the job's "
                      "recipe registers (the diffusion recipe's reward_model).")
    seed: int = Field(0, description="linear: seed of its weights.")
    gain: float = Field(8.0, gt=0, description="linear: reward scale.")
    spec: str | None = Field(None, description="A registered kind's reward model: the Loom job spec that trained it "
                             "(relative to this spec's folder).")
    model: str | None = Field(None, description="A registered kind's weights: a model.pt a run of `spec` wrote, or a "
                              "trained phase's '@<phase>/checkpoint' (relative to this spec's folder).")
    args: dict[str, Any] = Field(default_factory=dict, description="A registered kind's other arguments (e.g. the "
                                 "category it scores), checked by the recipe before anything runs.")

    @model_validator(mode="before")
    @classmethod
    def _resolve_paths(cls, data: Any, info: ValidationInfo) -> Any:
        """A relative ``spec`` or ``model`` is read from the spec file's folder (the validation context's ``base``);
        a phase reference is left to the pipeline (planner.pipeline.resolve_references)."""
        if isinstance(data, dict):
            base = Path((info.context or {}).get("base") or Path.cwd())
            data = {**data, **{k: str((base / Path(data[k]).expanduser()).absolute()) for k in ("spec", "model")
                               if isinstance(data.get(k), str) and data[k] and not data[k].startswith("@")}}
        return data

    @model_validator(mode="after")
    def _linear_takes_no_model(self) -> ScorerSpec:
        extra = [k for k in ("spec", "model", "args") if getattr(self, k)]
        if self.kind == "linear" and extra:
            raise ValueError(f"a linear scorer takes seed and gain, not {', '.join(extra)}. Remove them.")
        return self


class FeedbackSpec(StrictModel):
    """What a ``loss: feedback`` task scores its sample use's x0 with (docs/sampling.md): the frozen VAE decoder
    (a diffusers AutoencoderKL folder; none: x0 is the image) and K frozen scorers; per sample
    ``scale * sum_k ReLU(margin - r_k)``."""

    vae: str | None = Field(description="Folder of a diffusers AutoencoderKL (config.json and weights); its decoder "
                            "is used. null: the UNet denoises pixels (x0 is the image in [-1, 1], 3 channels).")
    scorers: list[ScorerSpec] = Field(min_length=1, description="The frozen reward models.")
    margin: float = Field(2.0, description="Hinge margin (IterComp: 2).")
    scale: float = Field(1e-3, gt=0, description="Loss scale (IterComp: 1e-3).")

    @model_validator(mode="before")
    @classmethod
    def _resolve_vae(cls, data: Any, info: ValidationInfo) -> Any:
        """A relative ``vae`` is read from the spec file's folder (the validation context's ``base``), else the cwd."""
        if isinstance(data, dict) and isinstance(data.get("vae"), str) and data["vae"]:
            base = Path((info.context or {}).get("base") or Path.cwd())
            data = {**data, "vae": str((base / Path(data["vae"]).expanduser()).absolute())}
        return data


class TaskSpec(StrictModel):
    """A training task: an ordered set of component uses, a batch size and a loss weight."""

    name: str = Field(description="Unique task name.")
    components: list[TaskComponentSpec] = Field(min_length=1, description="Component uses, in data-flow order.")
    batch_size: int = Field(ge=1, description="Global batch size (samples per iteration) of this task.")
    loss: str = Field("cross_entropy", description="Loss name (informational for planning).")
    loss_weight: float = Field(1.0, ge=0, description="Weight of this task's loss in the total.")
    pooling: Literal["model", "mean"] | None = Field(
        None, description="How a pooled loss (cross_entropy, mse, contrastive, infonce) turns each leaf's sequence "
        "into one vector: `model`, the pretrained tower's own pooler_output (CLIP, SigLIP, BERT; "
        "runtime.pretrained_pooling), or `mean` over positions after the head's LayerNorm; unset: the model's own "
        "where the leaf's model has one, else mean."
    )
    loss_args: dict[str, str | int | float] = Field(
        default_factory=dict, description="Options of the loss, checked by its head before anything runs (grpo, "
        "grpo_rm, grpo_rule: beta, kl: k3 | topk, topk; docs/job-spec.md, GRPO; the alignment recipe's sft_kl: topk). "
        "Other losses take none."
    )
    data: DataSpec | None = Field(
        None, description="Where the task's samples come from (planner.data_spec, docs/data.md); none: synthetic data."
    )
    feedback: FeedbackSpec | None = Field(
        None, description="loss feedback: the frozen VAE decoder and scorers (docs/sampling.md); only with it."
    )

    def upstream_names(self, use_index: int) -> list[str]:
        """Names of the uses feeding use ``use_index``, in its ``after:`` order: its ``after`` when given, else the
        previous use (a chain); [] for the first use and for ``after: []``. The one place this default is written."""
        use = self.components[use_index]
        if use.after is not None:
            return list(use.after)
        return [self.components[use_index - 1].use_name] if use_index else []

    @model_validator(mode="after")
    def _check_uses(self) -> TaskSpec:
        if (self.feedback is None) != (self.loss != "feedback"):
            raise ValueError(f"task '{self.name}': `feedback:` (the VAE folder and scorers) goes with loss "
                             f"'feedback' and only with it; the loss is '{self.loss}'"
                             f"{'' if self.feedback is None else ', remove feedback:'}.")
        seen: list[str] = []
        for i, use in enumerate(self.components):
            if use.use_name in seen:
                raise ValueError(
                    f"components[{i}].name ('{use.use_name}') is used twice in task '{self.name}'; "
                    "names must be unique. Give the second use its own `name:`."
                )
            for k, dep in enumerate(use.after or []):
                if dep in use.after[:k]:
                    raise ValueError(
                        f"components[{i}].after ('{dep}') names the same use twice in task '{self.name}'; each "
                        "upstream use feeds it once. Remove the repeat."
                    )
                if dep not in seen:
                    raise ValueError(
                        f"components[{i}].after ('{dep}') is not an earlier use in task '{self.name}'; "
                        f"{did_you_mean(dep, seen) if seen else 'the first use cannot depend on anything'}"
                    )
            seen.append(use.use_name)
        return self


class TrainingSpec(StrictModel):
    """How to train: steps, optimizer, checkpoints, seed."""

    steps: int = Field(100, ge=1, description="Training iterations.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-4, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon (added to the root of the second moment).")
    seed: int = Field(0, description="Seed of parameters and data (the runtime's layers have no dropout yet).")
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = never).")
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Compute precision: bf16/fp16 autocast forward over fp32 master weights and optimizer "
        "state (fp16 with loss scaling, GPU only), or fp32; the planner prices activations and gradients in it."
    )
    shard_optimizer: bool | Literal["auto"] = Field(
        "auto", description="ZeRO-1: shard fp32 master weights and Adam state over each data-parallel group. auto: the "
        "planner decides per plan, sharded or not, whichever it predicts faster and fits in device memory (its "
        "all-gather of the updated weights can end an iteration; without it every holder steps all its parameters)."
    )

    pipeline_micro_batches: bool | Literal["auto"] = Field(
        "auto", description="With grad_accum_steps > 1: true runs the micro-batches' forwards (then their backwards) "
        "as a pipeline (GPipe's fill and drain: a wave's devices start the next micro-batch while later waves run "
        "this one), so waves on devices of their own overlap, at the price of every micro-batch's saved activations "
        "held until its backward; false runs micro-batch after micro-batch. auto: the planner plans both and keeps "
        "the one it predicts faster that fits in device memory."
    )

    @field_validator("grad_accum_steps", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any) -> int | str:
        """One readable error for anything but a count >= 1 or auto."""
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"expected a whole number >= 1 or auto, got {value!r}")

    @field_validator("shard_optimizer", "pipeline_micro_batches", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: Any) -> bool | str:
        """One readable error for anything else (pydantic would report the bool and the literal apart)."""
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"expected true, false or auto, got {value!r}")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning rate after warmup: constant, or a linear or cosine decay from `lr` towards "
        "`lr * min_lr_ratio` at step `steps` (runtime.optim.lr_factor; a pure function of the step)."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup: step k < warmup_steps trains at lr * (k+1) / warmup_steps."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Where linear and cosine decay end, as a fraction of `lr`."
    )
    grad_clip: float | None = Field(
        None, ge=0, description="Clip gradients to this global L2 norm over every trainable parameter (each counted "
        "once, whatever device or tensor-parallel rank holds it); 0 or none: no clipping."
    )
    grad_accum_steps: int | Literal["auto"] = Field(
        1, description="Micro-batches per step: each task's batch_size rows are split into this many "
        "micro-batches (the planner plans one), their gradients accumulated, then synchronised and stepped once. A "
        "generate use decodes every micro-batch's rollouts at once, in the first; each micro-batch then scores and "
        "trains its rows (batch_size / grad_accum_steps must hold whole sample groups). auto: the planner plans 1, "
        "2, 4, ... micro-batches (each count the job's batches split into) and keeps the plan it predicts fastest "
        "(planner.api.plan_job); the plan records the count and `loom run` runs it."
    )

    @property
    def micro_batches(self) -> int:
        """The step's micro-batches: ``grad_accum_steps``, or 1 while ``auto`` is unresolved (a job before planning:
        its MetaGraph and cost model at one micro-batch; planner.api.plan_job plans each count, and a plan's job is
        planner.plan.job_for_plan's)."""
        return 1 if self.grad_accum_steps == "auto" else self.grad_accum_steps

    rollout_lag: int = Field(
        0, ge=0, le=1, description="0: on-policy (a step's rollouts are generated with the weights it starts from). "
        "1: one step off-policy (docs/job-spec.md \"Modes\"): step k's rollouts come from the weights step k-1 "
        "started from (step 0's from the initial ones), so the planner may generate them while step k-1 trains; a "
        "grpo loss then weighs each token by the clipped importance ratio against those behaviour log-probs."
    )
    max_restarts: int = Field(
        3, ge=0, description="`loom run`: times a run restarts its workers after one dies or hangs past "
        "step_timeout_s, resuming from the last complete checkpoint (step 0 without one); 0: the first loss ends it."
    )
    step_timeout_s: float | None = Field(
        None, gt=0, description="`loom run`'s step watchdog: a step that takes longer than this (seconds) counts as a "
        "hung worker (restart, naming the rank and wave it stopped in); none: no watchdog."
    )
    kernels: Literal["auto", "reference", "off"] = Field(
        "auto", description="Fused kernels (kernels/, docs/kernels.md) for the LM head's cross-entropy, InfoNCE, "
        "RMSNorm and SwiGLU: auto = Triton on a GPU, the chunked plain-torch twin on CPU; reference = the twin "
        "everywhere; off = the naive torch expressions (full logits). The planner prices the LM head's logits by it."
    )


class PlannerSpec(StrictModel):
    """Planner settings."""

    solver: Literal["highs", "cbc"] = Field("highs", description="MILP solver behind PuLP.")
    time_limit_s: float = Field(
        10.0, gt=0, description="Limit of the whole planning (search, placement, baselines, packing the plan) in CPU "
        "seconds of the planning thread, and the wall-clock limit of each MILP solve. A safety cap: each search step "
        "stops at a deterministic work budget first, except on the largest jobs and RL jobs with grad_accum_steps: "
        "auto, whose role-placement searches stop at it once each has a placement that fits (docs/planner.md)."
    )
    mip_gap: float = Field(0.005, ge=0, description="Relative MIP gap at which a solve stops.")
    level_barriers: bool = Field(
        False, description="Force Spindle-style level barriers (no overlap of MetaLevels) in Loom's plan."
    )


# Limits that keep planning bounded (docs/job-spec.md, "Limits"): checked when a spec is validated, each error names
# its limit. Generous for real jobs (the largest models have ~130 layers, the planner is benchmarked at 10,240 devices)
# and small enough that the planner's work (DP over devices, MetaOps x layers) stays within seconds.
MAX_DEVICES = 16_384  # cluster.num_nodes * cluster.devices_per_node
MAX_COMPONENTS = 64  # entries under `components`
MAX_TASKS = 64  # entries under `tasks`
MAX_USES_PER_TASK = 64  # entries of one task's `components`
MAX_USES = 512  # component uses summed over every task: the planner's MetaOps (benchmarked at 500: bench/planner scale)
MAX_LAYERS_PER_COMPONENT = 1_024  # components.<name>.num_layers
MAX_TOTAL_LAYERS = 16_384  # layers the planner schedules: num_layers summed over every task's uses
MAX_BATCH_SIZE = 1_048_576  # tasks[i].batch_size (samples per iteration)
MAX_SEQ_LEN = 2_097_152  # seq_len and cross_seq_len, of a component or a use (2M tokens)
MAX_IMAGE_SIZE = 65_536  # image_size in pixels, of a component or a use
MAX_WIDTH = 1_048_576  # hidden_size, ffn_hidden_size, vocab_size, out_features (and a unet2d level's channels)
MAX_LEVELS = MAX_IMAGE_SIZE.bit_length()  # 17: unet2d channel_mults entries, a VAE's levels (each halves the side)


class JobSpec(StrictModel):
    """A whole training job."""

    name: str = Field(description="Job name.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Devices.")
    components: dict[str, ComponentSpec] = Field(min_length=1, description="Model components by name.")
    tasks: list[TaskSpec] = Field(min_length=1, description="Tasks trained together.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training settings.")
    planner: PlannerSpec = Field(default_factory=PlannerSpec, description="Planner settings.")
    recipe: str | None = Field(
        None,
        description="A recipe Loom knows (e.g. medical; orchestrator.recipes lists them), whose losses, dataset and "
        "evaluator the orchestrator loads into the runtime; none: the built-in losses and synthetic data.",
    )
    data_dir: str | None = Field(
        None,
        description="A folder of real data for the recipe: one subfolder per split (train, heldout, transfer) in the "
        "format the recipe documents; none: the recipe's synthetic data.",
    )

    @field_validator("data_dir")
    @classmethod
    def _resolve_data_dir(cls, data_dir: str | None, info: ValidationInfo) -> str | None:
        """A relative ``data_dir`` is read from the spec file's folder (the validation context's ``base``), as
        ``pretrained:`` and data paths are; without a base, from the cwd."""
        base = (info.context or {}).get("base")
        if data_dir is None or base is None:
            return data_dir
        return str((Path(base) / Path(data_dir).expanduser()).absolute())

    @model_validator(mode="after")
    def _check_data_dir_has_a_recipe(self) -> JobSpec:
        """Only a recipe's dataset reads ``data_dir`` (runtime.data.register_dataset; a task's own ``data:`` names
        its files): without ``recipe:`` the folder would be ignored and the job train on synthetic data."""
        if self.data_dir is not None and self.recipe is None:
            raise ValueError(f"data_dir ({self.data_dir}) is read only by a recipe's dataset, and this job has no "
                             "`recipe:`, so it would be ignored. Set `recipe:` (docs/recipes/), give each task its "
                             "files under `data:` (docs/data.md), or remove data_dir.")
        return self

    @model_validator(mode="after")
    def _check_pretrained_uses(self) -> JobSpec:
        """Every use of a pretrained component within the positions its model embeds (planner.pretrained)."""
        from planner.pretrained import check_use  # local: only pretrained components need it

        for t, task in enumerate(self.tasks):
            for u, use in enumerate(task.components):
                comp = self.components.get(use.component)
                if comp is not None and comp.pretrained:
                    check_use(use.component, comp.pretrained, f"tasks[{t}].components[{u}]",
                              use.seq_len or comp.seq_len, use.image_size or comp.image_size)
        return self

    @model_validator(mode="after")
    def _check_name(self) -> JobSpec:
        """The name becomes a folder (``out/<name>``) and a Ray job id: a safe character set, so it never leaves
        the folder it is put in (no ``/``, no ``..``, not absolute)."""
        import re  # local: one use, and this edit leaves the shared import block as it is

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name) or ".." in self.name:
            raise ValueError(
                f"name ({self.name!r}) is not a safe job name; expected 1-64 characters from A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit, without '..'. Rename the job (e.g. 'my-job')."
            )
        return self

    @property
    def micro_batches_auto(self) -> bool:
        """Whether the planner chooses the step's micro-batches (``training.grad_accum_steps: auto``)."""
        return self.training.grad_accum_steps == "auto"

    def with_micro_batches(self, k: int) -> JobSpec:
        """This job with its steps in ``k`` micro-batches (``grad_accum_steps: k``; refused counts are the caller's
        to skip: :meth:`micro_batches_refused`)."""
        return self.model_copy(update={"training": self.training.model_copy(update={"grad_accum_steps": k})})

    def micro_batches_refused(self, k: int) -> str | None:
        """Why ``training.grad_accum_steps: k`` cannot split this job's steps (None: it can): every task's batch
        splits evenly, a generate use's sample groups stay whole, and no task has a sample use (its denoising loop
        runs once over the whole batch)."""
        for i, task in enumerate(self.tasks):
            if task.batch_size % k:
                return (f"tasks[{i}].batch_size ({task.batch_size}) is not divisible by training.grad_accum_steps "
                        f"({k}); each micro-batch needs the same rows. Make batch_size a multiple of grad_accum_steps.")
        for task in self.tasks if k > 1 else ():
            for u in task.components:
                if u.mode == "sample":  # runtime.executor refuses it too; said here, before anything runs
                    return (f"training.grad_accum_steps ({k}) > 1 with a sample use (task '{task.name}', use "
                            f"'{u.use_name}'): its denoising loop runs once over the whole batch. Set "
                            "grad_accum_steps: 1.")
                if u.mode == "generate" and (task.batch_size // k) % u.samples:
                    return (f"task '{task.name}' use '{u.use_name}': a micro-batch holds batch_size / grad_accum_steps "
                            f"= {task.batch_size // k} rows, which splits its groups of {u.samples} samples (GRPO "
                            "normalises advantages within a group). Make batch_size / grad_accum_steps a multiple of "
                            "samples.")
        return None

    @model_validator(mode="after")
    def _check_training(self) -> JobSpec:
        """Micro-batches split the steps (:meth:`micro_batches_refused`); fp16 needs a GPU (its loss scaling is a GPU
        path)."""
        why = None if self.micro_batches_auto else self.micro_batches_refused(self.training.grad_accum_steps)
        if why is not None:
            raise ValueError(why)
        lagged = [t for t in self.tasks if t.loss.startswith("grpo") and any(u.mode == "generate" for u in t.components)]
        if self.training.rollout_lag and not lagged:
            raise ValueError(
                "training.rollout_lag (1) needs a task with a grpo loss (grpo, grpo_rm, grpo_rule) and a generate use: "
                "only GRPO's loss corrects for rollouts of an older policy. Set rollout_lag: 0, or add a grpo task."
            )
        if self.training.precision == "fp16" and self.cluster.device.lower() == "cpu":
            raise ValueError(
                "training.precision ('fp16') is not supported on cluster.device cpu; CPUs compute in bf16 (autocast) "
                "or fp32. Set precision: bf16 or fp32."
            )
        return self

    @model_validator(mode="after")
    def _check_tensor_parallel(self) -> JobSpec:
        """A tensor-parallel group runs inside one node: a component needs a degree the planner can use there (it
        skips degrees above devices_per_node, so a list of only those leaves no layout at all)."""
        per_node = self.cluster.devices_per_node
        for name, comp in self.components.items():
            if min(comp.tensor_parallel) > per_node:
                raise ValueError(
                    f"components.{name}.tensor_parallel ({comp.tensor_parallel}) has no degree up to "
                    f"cluster.devices_per_node ({per_node}); a tensor-parallel group runs inside one node. Add a "
                    f"degree <= {per_node} (e.g. 1)."
                )
        return self

    @model_validator(mode="after")
    def _check_references(self) -> JobSpec:
        names = [t.name for t in self.tasks]
        for i, task in enumerate(self.tasks):
            if task.name in names[:i]:  # name the second use, as the use-name check does
                raise ValueError(
                    f"tasks[{i}].name ('{task.name}') is not unique (also tasks[{names.index(task.name)}].name); "
                    "each task needs its own name."
                )
            for j, use in enumerate(task.components):
                if use.component not in self.components:
                    raise ValueError(
                        f"tasks[{i}].components[{j}].component ('{use.component}') is not a component of this job; "
                        f"{did_you_mean(use.component, self.components)}"
                    )
        return self

    @model_validator(mode="before")
    @classmethod
    def _check_counts(cls, data: Any) -> Any:
        """The counts limits (MAX_COMPONENTS, MAX_TASKS, MAX_USES_PER_TASK) on the raw document, before any field is
        validated: the per-task and per-job checks compare names pairwise, so a huge list must not reach them."""
        if not isinstance(data, dict):
            return data
        sections = [("components", data.get("components"), MAX_COMPONENTS, "components"),
                    ("tasks", data.get("tasks"), MAX_TASKS, "tasks")]
        tasks = data.get("tasks")
        if isinstance(tasks, list) and len(tasks) <= MAX_TASKS:
            sections += [(f"tasks[{i}].components", task.get("components"), MAX_USES_PER_TASK, "uses in one task")
                         for i, task in enumerate(tasks) if isinstance(task, dict)]
        for path, value, limit, what in sections:
            if isinstance(value, (dict, list)) and len(value) > limit:
                raise ValueError(f"{path} ({len(value)} entries) is over the limit of {limit} {what}; the planner's "
                                 f"work grows with them. Split the job (see docs/job-spec.md, Limits).")
        uses = sum(len(task["components"]) for task in tasks if isinstance(task, dict)
                   and isinstance(task.get("components"), list)) if isinstance(tasks, list) else 0
        if uses > MAX_USES:
            raise ValueError(f"tasks[*].components ({uses} uses in all) is over the limit of {MAX_USES} component "
                             "uses in one job; the planner's work grows with them. Split the job "
                             "(see docs/job-spec.md, Limits).")
        return data

    @model_validator(mode="after")
    def _check_sizes(self) -> JobSpec:
        """The size limits (MAX_DEVICES, MAX_LAYERS_PER_COMPONENT, MAX_TOTAL_LAYERS, batch, sequence, image, width):
        values that pass their field's ``ge=1`` but would make planning run for hours or exhaust memory."""
        checks = [("cluster.num_nodes * cluster.devices_per_node", self.cluster.num_devices, MAX_DEVICES, "devices")]
        for name, comp in self.components.items():
            _check_levels(f"components.{name}", comp)
            if comp.channel_mults:
                checks.append((f"components.{name}.hidden_size x max(channel_mults)",
                               comp.hidden_size * max(comp.channel_mults), MAX_WIDTH, "channels"))
            checks.append((f"components.{name}.num_layers", comp.num_layers, MAX_LAYERS_PER_COMPONENT,
                           "layers per component"))
            checks += [(f"components.{name}.{field}", getattr(comp, field), limit, what) for field, limit, what in (
                ("seq_len", MAX_SEQ_LEN, "tokens"), ("cross_seq_len", MAX_SEQ_LEN, "tokens"),
                ("image_size", MAX_IMAGE_SIZE, "pixels"), ("hidden_size", MAX_WIDTH, "units"),
                ("ffn_hidden_size", MAX_WIDTH, "units"), ("vocab_size", MAX_WIDTH, "tokens"),
                ("out_features", MAX_WIDTH, "units"))]
        total = 0
        for i, task in enumerate(self.tasks):
            checks.append((f"tasks[{i}].batch_size", task.batch_size, MAX_BATCH_SIZE, "samples"))
            for j, use in enumerate(task.components):
                checks += [(f"tasks[{i}].components[{j}].seq_len", use.seq_len, MAX_SEQ_LEN, "tokens"),
                           (f"tasks[{i}].components[{j}].image_size", use.image_size, MAX_IMAGE_SIZE, "pixels")]
                total += self.components[use.component].num_layers if use.component in self.components else 0
        checks.append(("the job's layers (num_layers summed over every task's uses)", total, MAX_TOTAL_LAYERS,
                       "layers in one job"))
        for path, value, limit, what in checks:
            if value is not None and value > limit:
                raise ValueError(f"{path} ({value}) is over the limit of {limit} {what} that keeps planning "
                                 "bounded. Use a smaller value (see docs/job-spec.md, Limits).")
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> JobSpec:
        """A kind with attention heads splits hidden_size into num_heads equal heads (runtime.modules.attend), else
        a worker fails; after the size limits, which name the bigger problem. A pretrained component's heads are its
        config's (it may set head_dim)."""
        from planner.kinds import KINDS  # local: kinds imports this module

        for name, comp in self.components.items():
            kind = KINDS.get(comp.kind)
            if comp.pretrained is None and kind is not None and "num_heads" in kind.requires and comp.num_heads \
                    and comp.hidden_size % comp.num_heads:
                raise ValueError(
                    f"components.{name}.hidden_size ({comp.hidden_size}) is not divisible by num_heads "
                    f"({comp.num_heads}); each attention head gets hidden_size / num_heads units. Make hidden_size a "
                    "multiple of num_heads."
                )
        return self


# --------------------------------------------------------------------------- loading and errors


def _path_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of ``loc`` (for 'did you mean')."""
    current: Any = model
    skip_key = False
    for part in loc[:-1]:
        if skip_key:  # a key of a dict-valued field (e.g. a component's name), not a field name
            skip_key = False
            continue
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(str(part)) if isinstance(current, type) else None
        if field is None:
            return None
        skip_key = getattr(field.annotation, "__origin__", None) is dict
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", ())
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(args):  # dict[str, X] -> X, list[X] -> X
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def _check_levels(where: str, comp: ComponentSpec) -> None:
    """A unet2d's ``channel_mults`` has at most MAX_LEVELS entries: the planner's blocks grow with them, and each level
    halves the image side, so a use's image_size (at most MAX_IMAGE_SIZE) is divisible by 2^(levels - 1) only up to
    there."""
    levels = len(comp.channel_mults or ())
    if levels > MAX_LEVELS:
        raise ValueError(f"{where}.channel_mults ({levels} levels) is over the limit of {MAX_LEVELS} resolution levels "
                         f"that keeps planning bounded (each level halves the image side; an image of at most "
                         f"{MAX_IMAGE_SIZE} pixels has {MAX_LEVELS}). Use fewer levels (see docs/job-spec.md, "
                         "Limits).")


def _format_error(model: type[BaseModel], err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
    path = _path_str(loc)
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        owner = _model_at(model, loc)
        valid = list(owner.model_fields) if owner else []
        hint = did_you_mean(str(loc[-1]), valid) if valid else ""
        return f"{path}: unknown key; {hint} Remove or rename it."
    if kind == "missing":
        return f"{path}: required field is missing. Add it to the spec."
    if kind == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        prefix = _path_str(loc)
        return f"{prefix}.{msg}" if loc and msg.startswith(("components[", "tasks[")) else (
            f"{prefix}: {msg}" if loc else msg
        )
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return f"{path} ({shown}): {err['msg'].lower()}. Fix the value in the spec."


MICRO_BATCH_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # grad_accum_steps: auto plans each of these the job's batches split into


def micro_batch_counts(job: JobSpec) -> list[int]:
    """The counts of :data:`MICRO_BATCH_COUNTS` ``job``'s steps split into (:meth:`JobSpec.micro_batches_refused`):
    those ``grad_accum_steps: auto`` plans (planner.api) and ``loom profile`` measures (runtime.profiler)."""
    return [k for k in MICRO_BATCH_COUNTS if job.micro_batches_refused(k) is None]


def parse_job(data: Any, source: str = "job spec", base: Path | None = None) -> JobSpec:
    """Validate a parsed YAML/JSON document as a :class:`JobSpec`; raise one readable SpecError. ``base`` is the
    folder relative ``pretrained:`` paths are read from (the spec file's; default the cwd)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the top level must be a mapping with keys name, cluster, components, tasks.")
    if "phases" in data:  # planner.pipeline reads those; each of its trained phases is a JobSpec
        raise SpecError(f"{source}: phases: a phased job (docs/job-spec.md, Phases) is read by `loom validate`, "
                        "`loom plan` and `loom run`; this command takes a one-phase job. Give it one phase's spec.")
    try:
        return JobSpec.model_validate(data, context={"base": base})
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise SpecError(_format_error(JobSpec, first) + suffix) from None


def load_job(path: str | Path, cluster: str | Path | None = None) -> JobSpec:
    """Load and validate a job spec; ``cluster`` optionally replaces its `cluster` section with a YAML file's.
    ``recipe`` is only carried: the orchestrator checks and loads recipes (orchestrator.recipes)."""
    data = read_job_document(path, cluster)
    job = parse_job(data, source=str(path), base=Path(path).resolve().parent)
    from planner.components import check_components  # local: components imports spec

    check_components(job)
    return job


def job_schema() -> dict[str, Any]:
    """The JSON schema of a job spec, for editors. A component with ``pretrained:`` takes its kind and shape from
    its folder's config, so those fields are required only without it."""
    schema = JobSpec.model_json_schema()
    component = schema["$defs"]["ComponentSpec"]
    component["anyOf"] = [{"required": ["pretrained"]}, {"required": component.pop("required")}]
    return schema
