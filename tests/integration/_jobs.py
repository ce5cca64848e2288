"""The small two-task job the runtime's integration tests train (imported by those test files)."""

from __future__ import annotations


def two_task_job(num_devices: int, steps: int = 3) -> dict:
    """2 tasks, 3 components; the text tower `txt` is shared: a chain (img -> txt) and two branches."""
    return {
        "name": "two-task",
        "cluster": {"num_nodes": 1, "devices_per_node": num_devices, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                    "image_size": 8, "in_channels": 3},
            "txt": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 6},
            "aud": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 6},
        },
        "tasks": [
            # image -> shared text tower (a chain: txt reads img's 5 tokens), classification
            {"name": "caption", "batch_size": 8, "loss": "cross_entropy",
             "components": [{"component": "img"}, {"component": "txt", "seq_len": 5}]},
            # audio and text towers as independent branches, paired by a contrastive-style loss
            {"name": "align", "batch_size": 4, "loss": "contrastive",
             "components": [{"component": "aud", "after": []}, {"component": "txt", "after": []}]},
        ],
        "training": {"steps": steps, "precision": "fp32", "lr": 1e-2, "seed": 7},
        "planner": {"time_limit_s": 2},
    }


def decoder_job(num_devices: int, steps: int = 3) -> dict:
    """A shared ViT feeding a query decoder (2 tasks, different query counts and images) and a token decoder."""
    return {
        "name": "decoders",
        "cluster": {"num_nodes": 1, "devices_per_node": num_devices, "device": "cpu"},
        "components": {
            "enc": {"kind": "vit", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                    "image_size": 8, "in_channels": 1},
            "queries": {"kind": "decoder", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 3},
            "tokens": {"kind": "decoder", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 5,
                       "vocab_size": 20},
        },
        "tasks": [
            {"name": "classify", "batch_size": 8, "loss": "cross_entropy",
             "components": [{"component": "enc"}, {"component": "queries", "seq_len": 2}]},
            {"name": "segment", "batch_size": 4, "loss": "mse",
             "components": [{"component": "enc", "image_size": 12}, {"component": "queries"}]},
            {"name": "describe", "batch_size": 4, "loss": "cross_entropy",
             "components": [{"component": "enc"}, {"component": "tokens"}]},
        ],
        "training": {"steps": steps, "precision": "fp32", "lr": 1e-2, "seed": 3},
        "planner": {"time_limit_s": 2},
    }


def fusion_job(num_devices: int, steps: int = 3) -> dict:
    """An image tower and a text tower of the same width fused by a llama (causal) transformer that reads their outputs
    concatenated along the sequence (6 text tokens, then 5 image tokens: the `after:` order, the reverse of
    the uses' order); a second task uses the image tower alone, so `img` is shared."""
    return {
        "name": "fusion",
        "cluster": {"num_nodes": 1, "devices_per_node": num_devices, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                    "image_size": 8, "in_channels": 3},
            "txt": {"kind": "transformer", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 6},
            # causal, so the order of the fused tokens changes the outputs (a plain transformer and the
            # heads' mean pooling would not see it)
            "fuse": {"kind": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2,
                     "seq_len": 11},
        },
        "tasks": [
            {"name": "vqa", "batch_size": 8, "loss": "cross_entropy",
             "components": [{"component": "img"}, {"component": "txt", "after": []},
                            {"component": "fuse", "after": ["txt", "img"]}]},
            {"name": "tag", "batch_size": 4, "loss": "cross_entropy", "components": [{"component": "img"}]},
        ],
        "training": {"steps": steps, "precision": "fp32", "lr": 1e-2, "seed": 5},
        "planner": {"time_limit_s": 2},
    }


def connector_job(num_devices: int, steps: int = 3) -> dict:
    """Towers of different widths joined by connectors (runtime.connect): a ViT (5 tokens x 32) feeds a llama (48
    wide, 9 positions: the 5 image tokens projected, then 4 text tokens of its own) that learns to caption; in a
    second task the same two feed a scorer (an mlp, 16 wide, 1 position: the llama's 9 tokens projected and
    averaged), a reward model's shape; a third matches images with texts the llama reads alone (a root use of it),
    CLIP-style, the head projecting the llama's 48 to the ViT's 32."""
    return {
        "name": "connectors",
        "cluster": {"num_nodes": 1, "devices_per_node": num_devices, "device": "cpu"},
        "components": {
            "img": {"kind": "vit", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                    "image_size": 8, "in_channels": 3},
            "lm": {"kind": "llama", "num_layers": 2, "hidden_size": 48, "num_heads": 4, "num_kv_heads": 2,
                   "seq_len": 9, "vocab_size": 20},
            "score": {"kind": "mlp", "num_layers": 2, "hidden_size": 16, "seq_len": 1},
        },
        "tasks": [
            {"name": "caption", "batch_size": 8, "loss": "lm",
             "components": [{"component": "img"}, {"component": "lm"}]},
            {"name": "rate", "batch_size": 4, "loss": "mse",
             "components": [{"component": "img"}, {"component": "lm"}, {"component": "score"}]},
            {"name": "match", "batch_size": 4, "loss": "infonce",
             "components": [{"component": "img"}, {"component": "lm", "after": []}]},
        ],
        # AdamW turns float noise into 1e-5 at 1e-2
        "training": {"steps": steps, "precision": "fp32", "lr": 1e-3, "seed": 7},
        "planner": {"time_limit_s": 2},
    }


def diffusion_job(num_devices: int, steps: int = 3) -> dict:
    """A text encoder shared by a caption classifier and a text-conditioned UNet (noise prediction at two latent
    sizes: the UNet's parameters serve both), plus an unconditioned UNet of its own."""
    unet = {"kind": "unet2d", "num_layers": 1, "hidden_size": 8, "channel_mults": [1, 2], "num_heads": 2,
            "in_channels": 2, "image_size": 8}
    return {
        "name": "diffusion",
        "cluster": {"num_nodes": 1, "devices_per_node": num_devices, "device": "cpu"},
        "components": {
            "text": {"kind": "transformer", "num_layers": 2, "hidden_size": 16, "num_heads": 2, "seq_len": 6,
                     "vocab_size": 32},
            "unet": unet,
            "prior": unet | {"channel_mults": [1, 1]},
        },
        "tasks": [
            {"name": "caption", "batch_size": 4, "loss": "cross_entropy", "components": [{"component": "text"}]},
            {"name": "generate", "batch_size": 4, "loss": "mse",
             "components": [{"component": "text"}, {"component": "unet"}]},
            {"name": "generate_hires", "batch_size": 2, "loss": "mse",
             "components": [{"component": "text", "seq_len": 4}, {"component": "unet", "image_size": 12}]},
            {"name": "denoise", "batch_size": 4, "loss": "mse", "components": [{"component": "prior"}]},
        ],
        # AdamW turns float noise in a near-cancelling gradient element into an update of up to 2 x lr; at 1e-2 one such
        # element of the mid block's cross-attention put a module 1.1e-5 off the reference after 3 steps
        "training": {"steps": steps, "precision": "fp32", "lr": 1e-3, "seed": 5},
        "planner": {"time_limit_s": 2},
    }


def rollout_job(vocab_size: int = 40, precision: str = "fp32", steps: int = 2, rollout_lag: int = 0,
                **training) -> dict:
    """A tiny GRPO task on 2 devices: a policy generates 2 samples of 3 new tokens from 3-token prompts, a frozen
    reward model reads them (forward only) and the policy trains on them. ``vocab_size`` above 256 puts token ids on
    the wire that bf16 cannot hold exactly (tests/unit/runtime/test_wire_dtype.py); ``training``: more settings."""
    llama = {"kind": "llama", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": vocab_size,
             "seq_len": 6}
    return {
        "name": "rollout", "cluster": {"num_nodes": 1, "devices_per_node": 2, "device": "cpu"},
        "components": {"policy": llama, "reward": {**llama, "frozen": True}},
        "tasks": [{"name": "grpo", "batch_size": 4, "loss": "grpo", "components": [
            {"component": "policy", "name": "rollout", "mode": "generate", "seq_len": 3, "new_tokens": 3,
             "samples": 2},
            {"component": "reward", "mode": "forward", "after": ["rollout"]},
            {"component": "policy", "after": ["rollout"]}]}],
        "training": {"steps": steps, "lr": 1e-2, "precision": precision, "rollout_lag": rollout_lag, **training},
    }
