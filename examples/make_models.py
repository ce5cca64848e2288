"""Create the small pretrained models the examples and tests fine-tune, locally (nothing is downloaded).

Each builder makes a model from its library's config class with seeded random weights and ``save_pretrained``s it,
as a Hugging Face folder ``pretrained:`` can name. Run ``python examples/make_models.py [FOLDER]`` to write the
models of examples/hf-vlm-cpu.yaml into FOLDER (default ``examples/models``).
"""

from __future__ import annotations

import sys
from pathlib import Path


def save_llama(path: str | Path, seed: int = 0, model_type: str = "llama", **config) -> Path:
    """A small Llama-family causal LM (RoPE, grouped-query attention, RMSNorm, SwiGLU) saved at ``path``;
    ``config`` overrides the defaults (64 wide, 4 layers, 4 heads over 2 kv heads, vocabulary 128). ``model_type``
    picks the family: llama, qwen2, qwen3 or mistral."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    defaults = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg = AutoConfig.for_model(model_type, **(defaults | config))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return Path(path)


def save_clip_vision(path: str | Path, seed: int = 0, **config) -> Path:
    """A small CLIP vision tower (CLIPVisionModel: 32 wide, 2 layers, 16 px images in 4 px patches) saved at
    ``path``; ``config`` overrides the defaults."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    defaults = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                    patch_size=4, num_channels=3)
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**(defaults | config))).save_pretrained(path)
    return Path(path)


def save_clip(path: str | Path, seed: int = 0, **config) -> Path:
    """A small two-tower CLIPModel (each tower 32 wide, 2 layers; 16 px images in 4 px patches; vocabulary 100 with
    end-of-text 1; 16-dim projections) saved at ``path``: an image-text scorer (runtime.feedback.ClipScorer);
    ``config`` overrides CLIPConfig's top-level defaults."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = small | dict(vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=text, vision_config=small | dict(image_size=16, patch_size=4), projection_dim=16)
    CLIPModel(CLIPConfig(**(cfg.to_dict() | config))).save_pretrained(path)
    return Path(path)


def save_siglip_vision(path: str | Path, seed: int = 0, **config) -> Path:
    """A small SigLIP vision tower (SiglipVisionModel: 32 wide, 2 layers, 16 px images in 4 px patches, no class
    token, with its attention-pooling head) saved at ``path``; ``config`` overrides the defaults."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    defaults = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                    patch_size=4, num_channels=3)
    torch.manual_seed(seed)
    SiglipVisionModel(SiglipVisionConfig(**(defaults | config))).save_pretrained(path)
    return Path(path)


def save_text_tower(path: str | Path, family: str = "clip", seed: int = 0, **config) -> Path:
    """A small CLIP or SigLIP text tower (``family`` 'clip': CLIPTextModel, causal, pooled at the end-of-text token;
    'siglip': SiglipTextModel, bidirectional, pooled at the last token through its head; 32 wide, 2 layers,
    vocabulary 100, 16 positions) saved at ``path``; ``config`` overrides the defaults."""
    import torch
    import transformers

    cls = {"clip": "CLIP", "siglip": "Siglip"}[family]
    defaults = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    config_class, model_class = getattr(transformers, f"{cls}TextConfig"), getattr(transformers, f"{cls}TextModel")
    model_class(config_class(**(defaults | config))).save_pretrained(path)
    return Path(path)


def save_bert(path: str | Path, seed: int = 0, **config) -> Path:
    """A small BERT encoder (BertModel: 32 wide, 2 layers, vocabulary 100) saved at ``path``; ``config`` overrides
    the defaults."""
    import torch
    from transformers import BertConfig, BertModel

    defaults = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(BertConfig(**(defaults | config))).save_pretrained(path)
    return Path(path)


def save_unet(path: str | Path, seed: int = 0, **config) -> Path:
    """A small diffusers UNet2DConditionModel (32 then 64 channels, one block per level, a cross-attention down block
    at full resolution and a plain one below, contexts 32 wide, 8 px latents of 4 channels, 8 GroupNorm groups) saved
    at ``path`` (config.json and diffusion_pytorch_model.safetensors); ``config`` overrides the defaults."""
    import torch
    from diffusers import UNet2DConditionModel

    defaults = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
                    norm_num_groups=8, in_channels=4, out_channels=4, attention_head_dim=4,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(seed)
    UNet2DConditionModel(**(defaults | config)).save_pretrained(path)
    return Path(path)


def save_vae(path: str | Path, seed: int = 0, **config) -> Path:
    """A small diffusers AutoencoderKL (32 then 64 channels, so 2 px per latent along a side; 4 latent channels, 8
    GroupNorm groups, 16 px RGB images) saved at ``path``: the frozen encoder of a unet2d task's images
    (``tasks[].data.vae``); ``config`` overrides the defaults."""
    import torch
    from diffusers import AutoencoderKL

    defaults = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    torch.manual_seed(seed)
    AutoencoderKL(**(defaults | config)).save_pretrained(path)
    return Path(path)


def main(folder: str | Path = Path(__file__).resolve().parent / "models") -> None:
    """The models of examples/hf-vlm-cpu.yaml: a word-level tokenizer over the examples' data (chat.jsonl and the
    shapes' captions) saved with a Llama whose vocabulary is exactly its size, and a CLIP vision tower; and the VAE
    of examples/feedback-cpu.yaml."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_tokenizer import build_tokenizer, corpus_texts

    out, data = Path(folder), Path(__file__).resolve().parent / "data"
    texts = [t for corpus in (data / "chat.jsonl", data / "shapes" / "manifest.jsonl") for t in corpus_texts(corpus)]
    tokenizer = build_tokenizer(out / "llama", texts)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer, local_files_only=True))
    save_llama(out / "llama", vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3)
    save_clip_vision(out / "clip")
    save_vae(out / "vae")  # examples/feedback-cpu.yaml's frozen decoder
    print(f"wrote {out / 'llama'} (Llama, vocabulary {vocab}, with its tokenizer), {out / 'clip'} (CLIP vision) and "
          f"{out / 'vae'} (AutoencoderKL)")


if __name__ == "__main__":
    main(*sys.argv[1:])
