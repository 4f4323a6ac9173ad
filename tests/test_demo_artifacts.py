"""The shipped demo model and adapters, checked with the reference implementation.

transformers and peft define what the files compute: the base model must copy its
input, each adapter must do its task on held-out inputs, and every file must load
through the standard Hugging Face / PEFT code paths.
"""

import importlib.util
import json
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.demo import (DEMO_ADAPTER_NAMES, DEMO_BASE_MODEL_NAME, EXAMPLES, demo_adapters_dir,
                           demo_model_path, format_prompt)
from loraplex.demo.inputs import INPUT_CLASSES, MAX_INPUT_CHARS, MAX_SHORT_CHARS, PRINTABLE
from loraplex.demo.tasks import (TEXT_CLASSES, held_out_pairs, is_held_out, is_trainable, task_classes,
                                 training_pairs)
from loraplex.resolvers.validation import base_model_compatible, validate_adapter_dir

NUM_HELD_OUT = 30
MAX_TOTAL_BYTES = 8 * 1024 * 1024    # the issue allows 25 MB for the package; this catches growth
BASE_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def base_model():
    return load_base()


def load_base():
    return AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged_models():
    """Each adapter merged into its own copy of the base (PEFT's merge_and_unload): the
    same function as the unmerged PeftModel, and several times faster to generate with."""
    return {name: PeftModel.from_pretrained(load_base(), demo_adapters_dir() / name).merge_and_unload()
            for name in DEMO_ADAPTER_NAMES}


@pytest.fixture(scope="module")
def lora_model():
    """One PeftModel holding all three adapters, unmerged; set_adapter picks one."""
    first, *rest = DEMO_ADAPTER_NAMES
    model = PeftModel.from_pretrained(load_base(), demo_adapters_dir() / first, adapter_name=first)
    for name in rest:
        model.load_adapter(demo_adapters_dir() / name, adapter_name=name)
    return model.eval()


@torch.no_grad()
def greedy_answers(model, tokenizer, inputs: list[str], max_new_tokens: int) -> list[str]:
    batch = tokenizer([format_prompt(text) for text in inputs], return_tensors="pt",
                      padding=True, padding_side="left")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def exact_match(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    max_new = max(len(want.encode("utf-8")) for _, want in pairs) + 1   # + EOS
    answers = greedy_answers(model, tokenizer, [text for text, _ in pairs], max_new)
    return sum(got == want for got, (_, want) in zip(answers, pairs)) / len(pairs)


# --- behaviour -----------------------------------------------------------------------

@pytest.mark.parametrize("task", DEMO_ADAPTER_NAMES)
def test_adapter_does_its_task_on_held_out_inputs(merged_models, tokenizer, task):
    # Every input class takes turns; tests/test_demo_accuracy.py holds the engine to the targets.
    assert exact_match(merged_models[task], tokenizer, held_out_pairs(task, NUM_HELD_OUT)) >= 0.95


def test_base_model_echoes_and_does_none_of_the_tasks(base_model, tokenizer):
    assert exact_match(base_model, tokenizer, held_out_pairs("echo", NUM_HELD_OUT)) >= 0.9
    for task in DEMO_ADAPTER_NAMES:
        assert exact_match(base_model, tokenizer, held_out_pairs(task, NUM_HELD_OUT)) < 0.5, task


def test_documented_examples(base_model, lora_model, tokenizer):
    for task, pairs in EXAMPLES.items():
        inputs, wanted = [text for text, _ in pairs], [want for _, want in pairs]
        lora_model.set_adapter(task)
        max_new = max(len(want) for want in wanted) + 1
        assert greedy_answers(lora_model, tokenizer, inputs, max_new) == wanted
        base_answers = greedy_answers(base_model, tokenizer, inputs, max_new)
        assert base_answers == inputs     # the base model copies, sql requests included


def test_held_out_inputs_never_appear_in_training():
    """Held out by construction (a hash bucket no training stream draws from), and checked."""
    for task in ("echo", *DEMO_ADAPTER_NAMES):
        held_out = {text for c in task_classes(task) for text, _ in held_out_pairs(task, NUM_HELD_OUT, c)}
        assert len(held_out) == NUM_HELD_OUT * len(task_classes(task))
        assert all(is_held_out(text) and not is_trainable(text) for text in held_out)
        seen = {text for text, _ in islice(training_pairs(task, 7), 5000)}
        assert not seen & held_out, task
        assert not any(is_held_out(text) for text in seen) and not seen & {t for t, _ in EXAMPLES.get(task, [])}


def test_input_classes_are_what_they_say():
    for input_class in TEXT_CLASSES:
        texts = [text for text, _ in held_out_pairs("echo", 200, input_class)]
        assert all(set(text) <= set(PRINTABLE) and 1 <= len(text) <= MAX_INPUT_CHARS for text in texts)
        assert (min(map(len, texts)) > MAX_SHORT_CHARS) == (input_class == "long"), input_class
    checks = {"mixed": str.isupper, "digits": str.isdigit, "punct": lambda c: not c.isalnum() and c != " "}
    for input_class, is_kind in checks.items():
        assert all(any(is_kind(c) for c in text) for text, _ in held_out_pairs("echo", 200, input_class))
    assert set(INPUT_CLASSES) == set(TEXT_CLASSES)


# --- standard files ------------------------------------------------------------------

def test_base_checkpoint_is_a_standard_llama_checkpoint(base_model, tokenizer):
    path = demo_model_path()
    assert path.name == DEMO_BASE_MODEL_NAME
    for name in BASE_FILES:
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"]   # the GQA path
    assert config["torch_dtype"] == "float32" and config["max_position_embeddings"] == 256
    assert config["vocab_size"] == len(tokenizer) == base_model.get_input_embeddings().num_embeddings
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])


def test_tokenizer_is_byte_level_and_loads_without_transformers(tokenizer):
    raw = Tokenizer.from_file(str(demo_model_path() / "tokenizer.json"))
    text = "Input: héllo, World 42!\nOutput: "
    ids = raw.encode(text).ids
    assert ids == [tokenizer.bos_token_id] + [3 + b for b in text.encode("utf-8")]
    assert raw.decode(ids) == text
    assert tokenizer(text).input_ids == ids


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts import their siblings by name)."""
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(scripts))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(scripts))
    return module


def test_shipped_tokenizer_is_the_one_the_training_script_builds(tokenizer):
    demo_tokenizer = load_script("demo_tokenizer")
    shipped = Tokenizer.from_file(str(demo_model_path() / "tokenizer.json"))
    assert json.loads(demo_tokenizer.build_tokenizer().to_str()) == json.loads(shipped.to_str())
    assert tokenizer.chat_template == demo_tokenizer.CHAT_TEMPLATE
    assert len(tokenizer) == demo_tokenizer.VOCAB_SIZE


def test_chat_template_builds_the_demo_prompt(tokenizer):
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "hello world"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.bos_token + format_prompt("hello world")
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == rendered


def test_adapters_are_standard_peft_loras_of_differing_shapes():
    configs = {}
    for name in DEMO_ADAPTER_NAMES:
        files = validate_adapter_dir(demo_adapters_dir() / name)
        config = configs[name] = files.config
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        assert config["lora_alpha"] != config["r"]
        assert not config["use_rslora"] and not config["use_dora"] and config["modules_to_save"] is None
        assert config["base_model_name_or_path"] == DEMO_BASE_MODEL_NAME
        assert base_model_compatible(config["base_model_name_or_path"], str(demo_model_path()))
    assert len({c["r"] for c in configs.values()}) == len(configs)
    assert len({tuple(sorted(c["target_modules"])) for c in configs.values()}) >= 2


def test_shipped_files_are_small():
    demo_dir = demo_model_path().parent
    total = sum(p.stat().st_size for p in demo_dir.rglob("*") if p.is_file())
    assert total < MAX_TOTAL_BYTES


def test_demo_readme_reports_the_shipped_accuracy():
    """The demo README's accuracy table is the one train_demo.py measured on the shipped files,
    on 100 held-out inputs per class (500 per adapter), and meets the targets the README states."""
    demo_eval = load_script("demo_eval")
    report = json.loads((demo_model_path().parent / "training_report.json").read_text())
    held_out = report["held_out"]
    assert all(score["n"] == 100 for task in ("echo", "upper", "reverse") for score in held_out[task].values())
    assert held_out["sql"]["request"]["n"] == 500
    for task in ("upper", "reverse"):
        assert all(score["exact"] >= 0.99 for score in held_out[task].values()), held_out[task]
    readme = (demo_model_path().parent / "README.md").read_text()
    assert demo_eval.held_out_table(held_out) in readme
