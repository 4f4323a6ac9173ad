"""scripts/train_demo.py, run end to end in a shrunken size: it writes the shipped files' layout
and configs, and a rerun writes the same bytes (what makes the shipped files reproducible).
The full-size run takes minutes and is not repeated here; test_demo_artifacts checks its output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.demo import DEMO_ADAPTER_NAMES, DEMO_BASE_MODEL_NAME, demo_model_path
from loraplex.demo.tasks import TEXT_CLASSES, task_classes

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_demo.py"
# Seconds instead of minutes; every phase (tokenizer, base, each adapter, evaluation) still runs.
TINY_ARGS = ["--base-steps", "3", "--adapter-steps", "1", "1", "1", "--batch-size", "4",
             "--adapter-batch-size", "4", "--hidden", "16", "--layers", "1", "--num-eval", "1"]
SHRUNK_CONFIG_KEYS = {"head_dim", "hidden_size", "intermediate_size", "num_hidden_layers"}
VERSION_KEYS = {"transformers_version", "peft_version"}   # the installed libraries, not the script


def train(out: Path) -> Path:
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY_ARGS],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def written_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def json_without(path: Path, keys: set[str]) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in keys}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-demo")
    return train(root / "first"), train(root / "second")


def test_script_writes_the_shipped_layout(two_runs):
    out = two_runs[0]
    shipped = demo_model_path().parent
    shipped_model_files = [f"{DEMO_BASE_MODEL_NAME}/{p.name}" for p in demo_model_path().iterdir()]
    shipped_adapter_files = [f"adapters/{name}/{p.name}" for name in DEMO_ADAPTER_NAMES
                             for p in (shipped / "adapters" / name).iterdir()]
    assert set(written_files(out)) == {*shipped_model_files, *shipped_adapter_files, "training_report.json"}
    report = json.loads((out / "training_report.json").read_text())
    assert set(report["adapters"]) == set(DEMO_ADAPTER_NAMES) and report["base"]["steps"] == 3
    # Held-out scores of the written files: every task on every input class (sql: its requests,
    # then well-formedness on the other classes).
    assert set(report["held_out"]) == {"echo", *DEMO_ADAPTER_NAMES}
    for task, by_class in report["held_out"].items():
        assert list(by_class) == list(task_classes(task)) + (list(TEXT_CLASSES) if task == "sql" else []), task


def test_script_writes_the_shipped_tokenizer_and_configs(two_runs):
    out, shipped = two_runs[0], demo_model_path().parent
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / DEMO_BASE_MODEL_NAME / name).read_bytes() == (demo_model_path() / name).read_bytes(), name
    for name in ("config.json", "generation_config.json"):
        ignored = VERSION_KEYS | SHRUNK_CONFIG_KEYS
        assert json_without(out / DEMO_BASE_MODEL_NAME / name, ignored) == \
            json_without(demo_model_path() / name, ignored), name
    for name in DEMO_ADAPTER_NAMES:
        config = f"adapters/{name}/adapter_config.json"
        assert json_without(out / config, VERSION_KEYS) == json_without(shipped / config, VERSION_KEYS), name


def test_rerun_writes_the_same_bytes(two_runs):
    first, second = (written_files(out) for out in two_runs)
    reports = [json.loads(files.pop("training_report.json")) for files in (first, second)]
    # Timings are the one thing that may differ.
    assert [r.pop("train_seconds") >= 0 and r.pop("eval_seconds") >= 0 for r in reports] == [True, True]
    assert reports[0] == reports[1]   # the same losses and accuracies
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
