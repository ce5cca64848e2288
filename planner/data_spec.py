"""A task's data source as the user declares it (``tasks[].data``): format, where the files are, how to read them.

Only the declaration lives here (pydantic, torch-free, no file access): runtime.source_files reads and checks the
files, runtime.sources turns rows into batches. Imported by planner.spec; imports nothing of Loom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

DataFormat = Literal["text", "chat", "preference", "images"]
DATA_FORMATS: tuple[str, ...] = ("text", "chat", "preference", "images")


class DataSpec(BaseModel):
    """Where one task's samples come from instead of synthetic data (docs/data.md has every format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: DataFormat = Field(
        description="text: JSONL of {\"text\": ...}; chat: JSONL of {\"messages\": [{role, content}, ...]} rendered "
        "with the tokenizer's chat template, loss on assistant turns only; preference: JSONL of {prompt, chosen, "
        "rejected} (optional score_chosen, score_rejected); images: a folder of images with a manifest JSONL."
    )
    path: str = Field(
        description="The JSONL file (text, chat, preference) or the image folder (images); a relative path is read "
        "from the job spec file's folder (the working directory for a spec not read from a file)."
    )
    tokenizer: str | None = Field(
        None,
        description="A local tokenizer folder (tokenizer.json / tokenizer_config.json, loaded offline with "
        "transformers.AutoTokenizer), relative paths as `path`; default: the `pretrained` folder of the task's first "
        "token-input component.",
    )
    text_field: str = Field("text", description="text: the key of each line's text.")
    messages_field: str = Field("messages", description="chat: the key of each line's message list.")
    label_field: str = Field(
        "label",
        description="The key of each line's label when the task's loss needs one: an integer class in [0, 10) for "
        "cross_entropy, a number for mse (text and images formats).",
    )
    manifest: str = Field(
        "manifest.jsonl",
        description="images: the manifest inside `path`, one {\"image\": \"rel/path.png\", \"label\": ..., "
        "\"caption\": ...} per line, image paths relative to `path` and inside it.",
    )
    caption_field: str = Field(
        "caption", description="images: the key of a manifest line's caption, fed to the task's token-input uses."
    )
    vae: str | None = Field(
        None,
        description="images: a local diffusers AutoencoderKL folder, relative paths as `path`. The task's unet2d uses "
        "then train on the latents it encodes from the images (its latent distribution's mean times the config's "
        "scaling_factor; frozen, in each rank's loader), noised with a timestep and noise drawn per (seed, step, row).",
    )
    pack: bool = Field(
        False,
        description="text, chat: concatenate documents into full rows of the task's seq_len (per-document position "
        "ids and segment ids, so attention can stop at document boundaries) instead of one padded document per row.",
    )
    shuffle: bool = Field(
        True, description="Visit the rows in a seeded permutation per epoch (seed: training.seed); false: file order."
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_paths(cls, data: Any, info: ValidationInfo) -> Any:
        """Relative ``path`` and ``tokenizer`` become absolute, from the validation context's ``base`` (the spec
        file's folder, planner.spec.parse_job) or the working directory: workers may run elsewhere."""
        if not isinstance(data, dict):
            return data
        base = Path((info.context or {}).get("base") or Path.cwd())
        out = dict(data)
        for key in ("path", "tokenizer", "vae"):
            if isinstance(out.get(key), str) and out[key]:
                out[key] = str((base / Path(out[key]).expanduser()).absolute())
        return out

    @model_validator(mode="after")
    def _vae_reads_images(self) -> DataSpec:
        if self.vae is not None and self.format != "images":
            raise ValueError(f"vae: format {self.format} has no images to encode; a VAE encodes the images of format "
                             "images. Remove `vae:` or use format images.")
        return self

