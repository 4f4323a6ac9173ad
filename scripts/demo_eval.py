"""Held-out exact-match accuracy of the demo model (transformers generate, greedy)."""

from __future__ import annotations

import torch

from loraplex.demo.tasks import TASK_SAMPLERS, format_prompt, held_out_pairs

EVAL_BATCH = 50


@torch.no_grad()
def generate_answers(model, hf_tokenizer, inputs: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of the demo prompt for each input, left-padded batches."""
    answers = []
    for start in range(0, len(inputs), EVAL_BATCH):
        prompts = [format_prompt(text) for text in inputs[start:start + EVAL_BATCH]]
        batch = hf_tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=hf_tokenizer.pad_token_id, eos_token_id=hf_tokenizer.eos_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]                   # [batch, new]
        answers += hf_tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def score(model, hf_tokenizer, task: str, num: int) -> dict:
    """Exact-match accuracy on `num` held-out inputs, with a few of the misses."""
    pairs = held_out_pairs(task, num)
    max_new = max(len(answer) for _, answer in pairs) + 4
    answers = generate_answers(model, hf_tokenizer, [text for text, _ in pairs], max_new)
    misses = [[text, want, got] for got, (text, want) in zip(answers, pairs) if got != want]
    return {"accuracy": 1 - len(misses) / len(pairs), "misses": misses[:4]}


def evaluate(model, hf_tokenizer, num: int, tasks=tuple(TASK_SAMPLERS)) -> dict[str, dict]:
    model.eval()
    return {task: score(model, hf_tokenizer, task, num) for task in tasks}
