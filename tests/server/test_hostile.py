"""Hostile input over HTTP, each case against the real server with the filesystem and S3 resolvers
(adapters in a moto bucket): a 4xx that says what was wrong, no directory of the server in the
message, and the server serving everyone else afterwards."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters import write_peft_adapter
from loraplex.resolvers.remote import URI_ENV
from server.harness import API_KEY
from server.real_server import real_server
from servers.fixtures import s3_server  # noqa: F401 (fixture)
from servers.s3_server import upload_dir

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
DEEP = 100_000
MAX_ADAPTER_BYTES = 1_000_000
MAX_ADAPTER_FILES = 64


def rewrite_header(weights: Path, edit) -> None:
    """Replace the safetensors header of `weights` with edit(header) (a dict or raw JSON bytes)."""
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8:8 + length]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def set_offsets(value):
    def edit(header):
        header[first_tensor(header)]["data_offsets"] = value
        return header
    return edit


def deep_header(header):
    return b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}"


FILE_CASES = {
    # name: (how to break a good adapter directory, what the message must say)
    "offsets-string": (lambda d: rewrite_header(d / "adapter_model.safetensors", set_offsets("0-100")), "data_offsets"),
    "offsets-null": (lambda d: rewrite_header(d / "adapter_model.safetensors", set_offsets(None)), "data_offsets"),
    "offsets-nan": (lambda d: rewrite_header(d / "adapter_model.safetensors", set_offsets([0, float("nan")])),
                    "data_offsets"),
    "header-deep": (lambda d: rewrite_header(d / "adapter_model.safetensors", deep_header), "more than 32 levels deep"),
    "config-deep": (lambda d: (d / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "x": ' + "[" * DEEP + "]" * DEEP + "}"), "more than 32 levels deep"),
}


@pytest.fixture(scope="module")
def hostile(tiny_checkpoint, tmp_path_factory, s3_server):  # noqa: F811
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("hostile")
    cache = root / "cache"
    cache.mkdir()
    bucket = "hostile-bucket"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)

    def good(path, seed=0, **kw):
        return write_peft_adapter(path, seed=seed, base_model_name_or_path=ckpt, **kw)
    for case, (breakage, _) in FILE_CASES.items():
        for where in ("s3", "fs", "user"):
            directory = good(root / where / case) if where != "fs" else good(cache / f"fs-{case}")
            breakage(directory)
            if where == "s3":
                upload_dir(client, bucket, f"loras/s3-{case}", directory)
    upload_dir(client, bucket, "loras/fine", good(root / "src" / "fine", seed=1))
    upload_dir(client, bucket, "loras/rank64", good(root / "src" / "rank64", rank=64))
    crowded = good(root / "src" / "crowded", seed=2)
    for i in range(MAX_ADAPTER_FILES + 36):
        (crowded / f"note-{i}.txt").write_text("x")
    upload_dir(client, bucket, "loras/crowded", crowded)
    oversized = good(root / "src" / "oversized", seed=3)
    (oversized / "adapter_model.safetensors").write_bytes(b"\0" * (MAX_ADAPTER_BYTES + 1))
    upload_dir(client, bucket, "loras/oversized", oversized)
    upload_dir(client, bucket, "loras/with-junk", good(root / "src" / "with-junk", seed=4))
    client.put_object(Bucket=bucket, Key="loras/with-junk/junk.bin", Body=b"\0" * (30 * 2**20))
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_PLUGINS": "lora_filesystem_resolver,lora_s3_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache), URI_ENV: f"s3://{bucket}/loras",
           "LORAPLEX_RESOLVER_MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES),
           "LORAPLEX_RESOLVER_MAX_ADAPTER_FILES": str(MAX_ADAPTER_FILES), **s3_server.env()}
    argv = ["serve", ckpt, "--served-model-name", "tiny-base", "--enable-lora", "--max-lora-rank", "16",
            "--api-key", API_KEY]
    with real_server(argv, env) as server:
        with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=120) as http:
            yield {"server": server, "http": http, "root": root, "cache": cache, "bucket": bucket,
                   "s3": s3_server}


def post(hostile, route: str, body: dict) -> httpx.Response:
    # json.dumps escapes what httpx's encoder cannot send (a lone surrogate, as "\\ud800").
    return hostile["http"].post(route, content=json.dumps(body), headers={"content-type": "application/json"})


def complete(hostile, model: str) -> httpx.Response:
    return post(hostile, "/v1/completions", {"model": model, "prompt": "hello", "max_tokens": 3})


def check_refused(hostile, r: httpx.Response, status: int, reason: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert reason.lower() in message.lower(), message
    for private in (str(hostile["cache"]), ".loraplex-tmp", ".loraplex-locks"):
        assert private not in message, message
    # The server keeps serving everyone else.
    assert complete(hostile, "tiny-base").status_code == 200
    assert complete(hostile, "fine").status_code == 200


@pytest.mark.parametrize("name, reason", [
    ("é" * 200, "bytes in UTF-8"), ("é" * 255, "bytes in UTF-8"), ("org/" + "é" * 128, "bytes in UTF-8"),
    ("bad\ud800name", "unicode"), ("x" * 300, "characters long"), ("../etc", "'..'"),
])
@pytest.mark.parametrize("route", ["first request", "load_lora_adapter"])
def test_hostile_names(hostile, name, reason, route):
    if route == "first request":
        r = complete(hostile, name)
    else:
        r = post(hostile, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(hostile["root"])})
    check_refused(hostile, r, 400, reason)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
@pytest.mark.parametrize("where", ["s3", "fs", "user"])
def test_hostile_adapter_files(hostile, case, where):
    reason = FILE_CASES[case][1]
    if where == "user":    # /v1/load_lora_adapter with the user's own directory
        r = hostile["http"].post("/v1/load_lora_adapter", json={
            "lora_name": f"user-{case}", "lora_path": str(hostile["root"] / "user" / case)})
    else:                  # resolved on first request: from the bucket, or the filesystem resolver's dir
        r = complete(hostile, f"{where}-{case}")
    check_refused(hostile, r, 400, reason)
    if where == "s3":
        assert r.json()["error"]["message"].count(f"s3://{hostile['bucket']}/loras/s3-{case}") == 1


def test_too_many_files_or_bytes_are_refused_before_any_download(hostile):
    s3, bucket = hostile["s3"], hostile["bucket"]
    s3.reset_log()
    check_refused(hostile, complete(hostile, "crowded"), 400, f"at most {MAX_ADAPTER_FILES} entries")
    check_refused(hostile, complete(hostile, "oversized"), 400, f"over the limit of {MAX_ADAPTER_BYTES} bytes")
    for name in ("crowded", "oversized"):
        assert s3.downloads(bucket, f"loras/{name}/adapter_model.safetensors") == 0
        assert s3.downloads(bucket, f"loras/{name}/adapter_config.json") == 0


def test_junk_beside_an_adapter_is_never_downloaded(hostile):
    hostile["s3"].reset_log()
    assert complete(hostile, "with-junk").status_code == 200
    assert hostile["s3"].downloads(hostile["bucket"], "loras/with-junk/junk.bin") == 0
    assert sorted(p.name for p in (hostile["cache"] / "with-junk").iterdir()) == [
        ".loraplex-manifest.json", "adapter_config.json", "adapter_model.safetensors"]


def test_fifty_first_requests_for_an_invalid_adapter_share_one_download_and_one_load(hostile):
    s3, bucket = hostile["s3"], hostile["bucket"]
    s3.reset_log()
    invalid_before = invalid_loads(hostile)

    async def burst():
        async with httpx.AsyncClient(base_url=hostile["server"].base_url, headers=HEADERS, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json={
                "model": "rank64", "prompt": "hi", "max_tokens": 2}) for _ in range(50)))
    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {400}
    assert all("rank 64" in r.json()["error"]["message"] for r in responses)
    assert invalid_loads(hostile) == invalid_before + 1
    assert s3.downloads(bucket, "loras/rank64/adapter_model.safetensors") == 1
    # Remembered for a while: the next request is answered without asking the bucket.
    s3.reset_log()
    check_refused(hostile, complete(hostile, "rank64"), 400, "rank 64")
    assert not any("rank64" in r.path + r.query for r in s3.requests)


def invalid_loads(hostile) -> float:
    families = text_string_to_metric_families(hostile["http"].get("/metrics").text)
    return sum(s.value for f in families for s in f.samples
               if s.name == "loraplex_lora_first_request_loads_total" and s.labels == {"outcome": "invalid"})


def test_redoc_is_not_served_and_docs_are(hostile):
    assert hostile["http"].get("/redoc").status_code == 404
    assert hostile["http"].get("/openapi.json").status_code == 200
