"""Held-out accuracy of the demo model (transformers generate, greedy), by task and input class.

For echo, upper and reverse: exact match on held-out inputs of every class. For sql: exact
match on held-out requests of its grammar, and on held-out inputs of every other class the
share of answers that are still well-formed queries of its family (`parse_sql`).
"""

from __future__ import annotations

import torch

from loraplex.demo.sql_grammar import parse_sql
from loraplex.demo.tasks import SQL_CLASS, TEXT_CLASSES, format_prompt, held_out_pairs

EVAL_BATCH = 64
NUM_MISSES = 3


@torch.no_grad()
def generate_answers(model, hf_tokenizer, inputs: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of the demo prompt for each input, left-padded batches of similar length."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    answers: list[str] = [""] * len(inputs)
    for start in range(0, len(order), EVAL_BATCH):
        rows = order[start:start + EVAL_BATCH]
        batch = hf_tokenizer([format_prompt(inputs[i]) for i in rows], return_tensors="pt",
                             padding=True, padding_side="left").to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=hf_tokenizer.pad_token_id, eos_token_id=hf_tokenizer.eos_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]                   # [batch, new]
        for i, text in zip(rows, hf_tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[i] = text
    return answers


def exact_match(model, hf_tokenizer, pairs: list[tuple[str, str]]) -> dict:
    """Exact-match accuracy on `pairs`, with a few of the misses as [input, wanted, got]."""
    max_new = max(len(answer) for _, answer in pairs) + 2
    answers = generate_answers(model, hf_tokenizer, [text for text, _ in pairs], max_new)
    misses = [[text, want, got] for got, (text, want) in zip(answers, pairs) if got != want]
    return {"n": len(pairs), "exact": round(1 - len(misses) / len(pairs), 4), "misses": misses[:NUM_MISSES]}


def well_formed_sql(model, hf_tokenizer, inputs: list[str]) -> dict:
    """The share of answers to `inputs` that parse as queries of the sql family."""
    answers = generate_answers(model, hf_tokenizer, inputs, max_new_tokens=96)
    bad = [[text, got] for text, got in zip(inputs, answers) if parse_sql(got) is None]
    return {"n": len(inputs), "well_formed": round(1 - len(bad) / len(inputs), 4), "misses": bad[:NUM_MISSES],
            "examples": [[text, got] for text, got in zip(inputs[:2], answers[:2])]}


def evaluate(model, hf_tokenizer, task: str, num_per_class: int) -> dict[str, dict]:
    """{input class: scores} for `task` (echo is the base model's task)."""
    model.eval()
    if task != "sql":
        return {c: exact_match(model, hf_tokenizer, held_out_pairs(task, num_per_class, c)) for c in TEXT_CLASSES}
    scores = {SQL_CLASS: exact_match(model, hf_tokenizer, held_out_pairs("sql", num_per_class * len(TEXT_CLASSES)))}
    for c in TEXT_CLASSES:
        scores[c] = well_formed_sql(model, hf_tokenizer, [text for text, _ in held_out_pairs("echo", num_per_class, c)])
    return scores


def held_out_table(held_out: dict[str, dict]) -> str:
    """The demo README's accuracy table (markdown) from training_report.json's "held_out"."""
    def cell(score: dict) -> str:
        value = score.get("exact", score.get("well_formed"))
        return f"{value:.0%}" if value in (0, 1) else f"{value:.1%}"

    classes = list(TEXT_CLASSES)
    rows = ["| model, measure | " + " | ".join(classes) + " | sql questions |",
            "| --- |" + " ---: |" * (len(classes) + 1)]
    labels = {"echo": "base model: copies exactly", "upper": "upper: exact", "reverse": "reverse: exact"}
    for task, label in labels.items():
        rows.append(f"| {label} | " + " | ".join(cell(held_out[task][c]) for c in classes) + " | |")
    sql = held_out["sql"]
    rows.append("| sql: exact on its questions | " + " | " * len(classes) + f"{cell(sql[SQL_CLASS])} |")
    rows.append("| sql: a well-formed query of its family | "
                + " | ".join(cell(sql[c]) for c in classes) + " | |")
    return "\n".join(rows) + "\n"
