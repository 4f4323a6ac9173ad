"""Train the embedded demo from scratch: a tiny Llama base model and three LoRA adapters.

    .venv/bin/python scripts/train_demo.py            # writes src/loraplex/demo/{loraplex-demo-base,adapters}
    .venv/bin/python scripts/train_demo.py --out /tmp/demo --base-steps 200   # a quick try
    .venv/bin/python scripts/train_demo.py --out /tmp/demo --base-steps 3 --adapter-steps 1 1 1 \
        --hidden 16 --layers 1 --num-eval 1             # seconds: checks the script runs end to end

Phases: (1) a byte-level tokenizer; (2) the base model, trained on a mixture that
gives it general skills: copying in the demo prompt format (its behaviour there),
plus drills in other phrasings that spell text backwards, in capitals and as SQL,
on inputs of every class (inputs.py) and a curriculum of lengths up to 64 characters;
(3) one PEFT LoRA per task (upper, reverse, sql) on the frozen base, which binds
the demo format to one skill; (4) held-out accuracy of the written files, by input
class, with greedy decoding, written to training_report.json.

Deterministic: fixed seeds, deterministic torch algorithms and one CPU thread, so a
rerun on the same machine and library versions reproduces the files bit for bit
(other CPUs or versions may differ in the last bits of the float32 weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_data import BatchMaker, base_mixture, task_stream  # noqa: E402
from demo_eval import evaluate, held_out_table  # noqa: E402
from demo_tokenizer import VOCAB_SIZE, build_tokenizer, save_tokenizer_files  # noqa: E402
from loraplex.demo import DEMO_BASE_MODEL_NAME  # noqa: E402
from loraplex.demo.inputs import INPUT_CLASSES  # noqa: E402
from loraplex.demo.tasks import ADAPTER_TASKS  # noqa: E402

SEED = 7
# One thread: on a shared machine two threads wait on each other far more than they
# gain, and the thread count is part of what makes float sums reproducible.
NUM_THREADS = 1
NUM_EVAL_PER_CLASS = 100

# The base model's mixture (shares of examples) and its curriculum: (share of the
# steps, longest input in characters). Short inputs first teach copying cheaply.
BASE_MIXTURE = {"echo": 0.3, "reverse": 0.45, "upper": 0.1, "sql": 0.15}
CURRICULUM = ((1 / 7, 16), (2 / 7, 32), (4 / 7, 64))
# The share of text inputs that are repetitive text (demo_data.repetitive_text).
REPEAT_SHARE = 0.15
# What each text adapter trains on besides its task's inputs: the share of repetitive text,
# the share of inputs with runs of one character (demo_data.with_runs), and how often long
# inputs come beside each short class. upper copies, and copying loses count in runs and
# repeats, so upper sees more of them (measured: long inputs 0.97 exact without, 0.99 with).
ADAPTER_DATA = {
    "upper": dict(repeat_share=0.3, run_share=0.25, long_weight=3.0),
    "reverse": dict(repeat_share=REPEAT_SHARE, run_share=0.0, long_weight=2.0),
    "sql": dict(repeat_share=0.0, run_share=0.0, long_weight=1.0),
}

# Differing ranks, scalings (alpha / r) and target sets, so an engine's LoRA path is exercised
# in more than one shape. upper on attention only (r 4) missed long inputs: it takes all seven.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_SPECS = {
    "upper": dict(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS),
    "reverse": dict(r=16, lora_alpha=32, target_modules=ALL_PROJECTIONS),
    "sql": dict(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
}


def model_config(args):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,  # GQA: 2 q heads per KV head
        head_dim=args.hidden // 8,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=0.06,     # wider than 0.02 for a 128-wide model: copying is learnt sooner
    )


def train_loop(model, params, phases, *, lr: float, label: str) -> list[float]:
    """AdamW with linear warm-up and cosine decay over all phases; returns the loss every 50 steps.

    phases: [(steps, BatchMaker)], trained in order.
    """
    steps = sum(n for n, _ in phases)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses, start, step = [], time.time(), 0
    for num_steps, batches in phases:
        for _ in range(num_steps):
            input_ids, labels = (t.to(model.device) for t in batches.next())
            # Right padding only: the causal mask already keeps real tokens off the pads.
            logits = model(input_ids=input_ids).logits                      # [batch, seq, vocab]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == steps - 1:
                losses.append(round(loss.item(), 4))
                print(f"[{label}] step {step:5d}/{steps} loss {loss.item():.4f} "
                      f"({time.time() - start:.0f}s)", flush=True)
            step += 1
    model.eval()
    return losses


def base_phases(tokenizer, args) -> list[tuple[int, BatchMaker]]:
    phases, done = [], 0
    for i, (share, max_chars) in enumerate(CURRICULUM):
        steps = round(args.base_steps * share) if i < len(CURRICULUM) - 1 else args.base_steps - done
        stream = base_mixture(args.seed + i, BASE_MIXTURE, max_chars, REPEAT_SHARE)
        phases.append((steps, BatchMaker(tokenizer, stream, args.batch_size, seed=args.seed + i)))
        done += steps
    return phases


def train_base(tokenizer, args):
    from transformers import LlamaForCausalLM
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args)).to(args.device)
    losses = train_loop(model, list(model.parameters()), base_phases(tokenizer, args),
                        lr=args.base_lr, label="base")
    return model, losses


def train_adapter(base, tokenizer, task, args):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(args.seed + 1 + ADAPTER_TASKS.index(task))
    config = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **ADAPTER_SPECS[task])
    model = get_peft_model(base, config, adapter_name="default")
    data = ADAPTER_DATA[task]
    weights = {c: (data["long_weight"] if c == "long" else 1.0) for c in INPUT_CLASSES}
    stream = task_stream(task, args.seed, data["repeat_share"], weights, data["run_share"])
    batches = BatchMaker(tokenizer, stream, args.adapter_batch_size, seed=args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train_loop(model, params, [(args.adapter_steps[task], batches)], lr=args.adapter_lr[task], label=task)
    return model, losses


def save_base(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = "float32"       # older readers look for torch_dtype, newer for dtype
    config["dtype"] = "float32"
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tokenizer_files(tokenizer, out)


def save_adapter(peft_model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = DEMO_BASE_MODEL_NAME
    config["target_modules"] = sorted(config["target_modules"])    # PEFT writes a set's order
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)     # PEFT's model-card template


def evaluate_written(out: Path, args) -> dict:
    """Held-out scores of the files as written, by task: echo for the base model, and each
    adapter's task with the adapter merged into a fresh copy of the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load_base():
        return AutoModelForCausalLM.from_pretrained(out / DEMO_BASE_MODEL_NAME, dtype=torch.float32).eval()

    tokenizer = AutoTokenizer.from_pretrained(out / DEMO_BASE_MODEL_NAME)
    scores = {"echo": evaluate(load_base(), tokenizer, "echo", args.num_eval)}
    for task in args.tasks:
        merged = PeftModel.from_pretrained(load_base(), out / "adapters" / task).merge_and_unload()
        scores[task] = evaluate(merged, tokenizer, task, args.num_eval)
    for task, by_class in scores.items():
        print(task, {c: s.get("exact", s.get("well_formed")) for c, s in by_class.items()}, flush=True)
    return scores


def library_versions() -> dict[str, str]:
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "src" / "loraplex" / "demo")
    parser.add_argument("--base-steps", type=int, default=3500)
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--adapter-steps", type=int, nargs=3, default=(1200, 600, 1000),
                        metavar=("UPPER", "REVERSE", "SQL"))
    parser.add_argument("--adapter-lr", type=float, nargs=3, default=(5e-3, 5e-3, 5e-3),
                        metavar=("UPPER", "REVERSE", "SQL"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapter-batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default="cpu", help="cpu reproduces the shipped files; cuda is for trials")
    parser.add_argument("--tasks", nargs="*", default=list(ADAPTER_TASKS))
    parser.add_argument("--num-eval", type=int, default=NUM_EVAL_PER_CLASS,
                        help="held-out inputs per input class for the accuracy in training_report.json")
    args = parser.parse_args()
    args.adapter_steps = dict(zip(ADAPTER_TASKS, args.adapter_steps))
    args.adapter_lr = dict(zip(ADAPTER_TASKS, args.adapter_lr))
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(NUM_THREADS)
    if args.device == "cpu":
        torch.use_deterministic_algorithms(True)
    started = time.time()
    tokenizer = build_tokenizer()

    base, base_losses = train_base(tokenizer, args)
    save_base(base, tokenizer, args.out / DEMO_BASE_MODEL_NAME)
    report = {"versions": library_versions(), "seed": args.seed, "device": args.device, "threads": NUM_THREADS,
              "hidden": args.hidden, "layers": args.layers, "batch_size": args.batch_size,
              "base": {"steps": args.base_steps, "lr": args.base_lr, "mixture": BASE_MIXTURE,
                       "curriculum": CURRICULUM, "losses": base_losses},
              "adapters": {}}

    for task in args.tasks:
        for p in base.parameters():
            p.requires_grad_(False)
        peft_model, losses = train_adapter(base, tokenizer, task, args)
        save_adapter(peft_model, args.out / "adapters" / task)
        report["adapters"][task] = {**ADAPTER_SPECS[task], "steps": args.adapter_steps[task],
                                    "lr": args.adapter_lr[task], "losses": losses}
        base = peft_model.unload()                # the untouched base, for the next adapter
    report["adapter_batch_size"] = args.adapter_batch_size
    report["train_seconds"] = round(time.time() - started)

    report["held_out"] = evaluate_written(args.out, args)
    report["eval_seconds"] = round(time.time() - started) - report["train_seconds"]
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(held_out_table(report["held_out"]), end="")
    print(f"trained in {report['train_seconds']}s, evaluated in {report['eval_seconds']}s", flush=True)


if __name__ == "__main__":
    main()
