"""Answers from an exported model folder, for the recipe's evaluation steps and benches: load a ``from_pretrained``
folder (the model with its tokenizer beside it, as a trained phase exports it) and decode prompts greedily.

Prompts are plain text (the recipe never applies the chat template). A batch is left-padded with an attention mask,
so a padded prompt decodes as it would alone; decoding stops at eos, which is not part of the answer.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load(folder: str | Path):
    """(model in eval mode, tokenizer) from ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], new_tokens: int, batch_size: int = 16) -> list[str]:
    """Each prompt's greedy answer (at most ``new_tokens`` tokens, ending before eos), in order."""
    answers = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers
