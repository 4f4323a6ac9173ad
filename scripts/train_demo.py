"""Train the embedded demo from scratch: a tiny Llama base model and three LoRA adapters.

    .venv/bin/python scripts/train_demo.py            # writes src/loraplex/demo/{loraplex-demo-base,adapters}
    .venv/bin/python scripts/train_demo.py --out /tmp/demo --base-steps 200   # a quick try
    .venv/bin/python scripts/train_demo.py --out /tmp/demo --base-steps 2 --adapter-steps 1 1 1 \
        --hidden 16 --layers 1 --num-eval 2             # seconds: checks the script runs end to end

Phases: (1) a byte-level tokenizer; (2) the base model, trained on a mixture that
gives it general skills: copying in the demo prompt format (its behaviour there),
plus prose drills that spell words backwards and in capitals, plus generic text
with digits, capitals and punctuation;
(3) one PEFT LoRA per task (upper, reverse, sql) on the frozen base; (4) held-out
accuracy with greedy decoding, written to training_report.json.

Deterministic: fixed seeds, deterministic torch algorithms and 2 CPU threads, so a
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
from demo_eval import evaluate  # noqa: E402
from demo_tokenizer import VOCAB_SIZE, build_tokenizer, save_tokenizer_files  # noqa: E402
from loraplex.demo import DEMO_BASE_MODEL_NAME  # noqa: E402
from loraplex.demo.tasks import ADAPTER_TASKS, excluded_inputs  # noqa: E402

SEED = 7
NUM_THREADS = 2
NUM_EVAL_PER_TASK = 100

# Differing ranks, scalings (alpha / r) and target sets, so an engine's LoRA path
# is exercised in more than one shape.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_SPECS = {
    "upper": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "reverse": dict(r=16, lora_alpha=32, target_modules=ALL_PROJECTIONS),
    "sql": dict(r=8, lora_alpha=24, target_modules=ALL_PROJECTIONS),
}


def model_config(args):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,  # GQA: 2 q heads per KV head
        head_dim=args.hidden // 4,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
    )


def train_loop(model, params, batches, *, steps: int, lr: float, label: str) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss every 50 steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses, start = [], time.time()
    for step in range(steps):
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
    model.eval()
    return losses


def train_base(tokenizer, excluded, args):
    from transformers import LlamaForCausalLM
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args)).to(args.device)
    batches = BatchMaker(tokenizer, base_mixture(args.seed, excluded), args.batch_size)
    losses = train_loop(model, list(model.parameters()), batches,
                        steps=args.base_steps, lr=args.base_lr, label="base")
    return model, losses


def train_adapter(base, tokenizer, task, excluded, args):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(args.seed + 1 + ADAPTER_TASKS.index(task))
    config = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **ADAPTER_SPECS[task])
    model = get_peft_model(base, config, adapter_name="default")
    batches = BatchMaker(tokenizer, task_stream(task, args.seed, excluded), args.adapter_batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train_loop(model, params, batches, steps=args.adapter_steps[task],
                        lr=args.adapter_lr[task], label=task)
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


def library_versions() -> dict[str, str]:
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "src" / "loraplex" / "demo")
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--adapter-steps", type=int, nargs=3, default=(300, 600, 1500),
                        metavar=("UPPER", "REVERSE", "SQL"))
    parser.add_argument("--adapter-lr", type=float, nargs=3, default=(5e-3, 5e-3, 5e-3),
                        metavar=("UPPER", "REVERSE", "SQL"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapter-batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--device", default="cpu", help="cpu reproduces the shipped files; cuda is for trials")
    parser.add_argument("--tasks", nargs="*", default=list(ADAPTER_TASKS))
    parser.add_argument("--num-eval", type=int, default=NUM_EVAL_PER_TASK,
                        help="held-out inputs per task for the accuracy in training_report.json")
    args = parser.parse_args()
    args.adapter_steps = dict(zip(ADAPTER_TASKS, args.adapter_steps))
    args.adapter_lr = dict(zip(ADAPTER_TASKS, args.adapter_lr))
    return args


def main() -> None:
    from transformers import AutoTokenizer
    args = parse_args()
    torch.set_num_threads(NUM_THREADS)
    if args.device == "cpu":
        torch.use_deterministic_algorithms(True)
    started = time.time()
    tokenizer = build_tokenizer()
    excluded = excluded_inputs()

    base, base_losses = train_base(tokenizer, excluded, args)
    save_base(base, tokenizer, args.out / DEMO_BASE_MODEL_NAME)
    hf_tokenizer = AutoTokenizer.from_pretrained(args.out / DEMO_BASE_MODEL_NAME)
    report = {"versions": library_versions(), "seed": args.seed, "device": args.device,
              "hidden": args.hidden, "layers": args.layers, "batch_size": args.batch_size,
              "base": {"steps": args.base_steps, "lr": args.base_lr, "losses": base_losses,
                       "accuracy": evaluate(base, hf_tokenizer, args.num_eval)},
              "adapters": {}}
    print("base accuracy", report["base"]["accuracy"], flush=True)

    for task in args.tasks:
        for p in base.parameters():
            p.requires_grad_(False)
        peft_model, losses = train_adapter(base, tokenizer, task, excluded, args)
        save_adapter(peft_model, args.out / "adapters" / task)
        accuracy = evaluate(peft_model, hf_tokenizer, args.num_eval, tasks=(task,))
        print(task, "accuracy", accuracy, flush=True)
        report["adapters"][task] = {**ADAPTER_SPECS[task], "steps": args.adapter_steps[task],
                                    "lr": args.adapter_lr[task], "losses": losses, "accuracy": accuracy}
        base = peft_model.unload()                # the untouched base, for the next adapter

    report["adapter_batch_size"] = args.adapter_batch_size
    report["train_seconds"] = round(time.time() - started)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {report['train_seconds']}s", flush=True)


if __name__ == "__main__":
    main()
