"""Structural validation against hostile files: every malformed header or config is an
AdapterInvalidError saying what is wrong, with sizes, counts and nesting bounded before parsing."""

from __future__ import annotations

import json
import struct

import pytest

from adapters import write_peft_adapter
from loraplex.errors import AdapterInvalidError
from loraplex.resolvers import validation
from loraplex.resolvers.validation import check_safetensors_file, json_depth, validate_adapter_dir


def write_header(path, header: bytes | dict, data: bytes = b"\0" * 64) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("offsets", ["0-8", None, [0, float("nan")], [0], [0, 8, 16], [8, 0], [-1, 8],
                                     [0, 8.0], [True, 8], {"start": 0}])
def test_bad_data_offsets(tmp_path, offsets):
    path = tmp_path / "w.safetensors"
    write_header(path, {"t": {"dtype": "F32", "shape": [2], "data_offsets": offsets}})
    with pytest.raises(AdapterInvalidError, match="tensor 't' has invalid data_offsets"):
        check_safetensors_file(path)


@pytest.mark.parametrize("header, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 32 levels deep"),
    (b'{"t": ' + b"{" * 32 + b"}" * 32 + b"}", "nested more than 32 levels deep"),   # 33
    (b'{"t": "unterminated', "not a safetensors file"),
    (b"[1, 2]", "header is not an object"),
    (b'{"t": 5}', "invalid data_offsets"),
])
def test_bad_headers(tmp_path, header, message):
    path = tmp_path / "w.safetensors"
    write_header(path, header)
    with pytest.raises(AdapterInvalidError, match=message):
        check_safetensors_file(path)


def test_too_many_tensors_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "MAX_SAFETENSORS_TENSORS", 10)
    path = tmp_path / "w.safetensors"
    write_header(path, {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(11)})
    with pytest.raises(AdapterInvalidError, match="more than 10 tensors"):
        check_safetensors_file(path)


def test_bad_configs(tmp_path, monkeypatch):
    adapter = write_peft_adapter(tmp_path / "a")
    config = adapter / "adapter_config.json"
    config.write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AdapterInvalidError, match="adapter_config.json is nested more than 32 levels deep"):
        validate_adapter_dir(adapter)
    monkeypatch.setattr(validation, "MAX_ADAPTER_CONFIG_BYTES", 100)
    config.write_text(json.dumps({"peft_type": "LORA", "notes": "x" * 200}))
    with pytest.raises(AdapterInvalidError, match="adapter_config.json is 2\\d\\d bytes"):
        validate_adapter_dir(adapter, where="adapter 'a' from s3://b/a")


def test_messages_use_the_label(tmp_path):
    with pytest.raises(AdapterInvalidError) as info:
        validate_adapter_dir(tmp_path / "nowhere", where="adapter 'x' from s3://bucket/x")
    assert str(info.value) == "adapter 'x' from s3://bucket/x does not exist (no such directory)"


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}], "c": "\\\\\\"[["}', 32) == 3
    assert json_depth(b"", 32) == 0 and json_depth(b"42", 32) == 0


def test_json_depth_counts_each_level_up_to_the_limit():
    assert json_depth(b'[{"a": [[1], {"b": []}]}, [[[2]]]]', 32) == 5        # the deepest branch counts
    assert json_depth(b"[" * 32 + b"]" * 32, 32) == 32
    assert json_depth(b"{" * 33 + b"}" * 33, 32) == 33
    assert json_depth(b"[" * 5_000_000 + b"]" * 5_000_000, 32) == 33        # stops past the limit


def test_json_depth_of_many_brackets_is_counted_alike():
    # Past 64 KiB of brackets the count is a running sum instead of passes: the same answers.
    wide = b"[" + b"[[1],{}]," * 20_000 + b"[]]"                          # 3 deep, 180 KB of brackets
    narrow = b"[" + b"[[1],{}]," * 6_000 + b"[]]"                         # 36 KB of brackets: passes
    assert json_depth(wide, 32) == 3 and json_depth(narrow, 32) == 3
    deep = b"[" * 40 + wide + b"]" * 40
    assert json_depth(deep, 32) == 33 and json_depth(deep, 64) == 43
