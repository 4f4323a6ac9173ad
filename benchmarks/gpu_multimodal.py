"""Images and audio mixed with text through `loraplex serve`: throughput, time to first token, encoder time.

    PYTHONPATH=src:tests python3 benchmarks/gpu_multimodal.py [--model llava|speech|both] [--runs 3]
    PYTHONPATH=src:tests python3 benchmarks/gpu_multimodal.py --smoke     # tiny shapes on the CPU: checks the script

For each model shape (random weights, load_format="dummy"; the shapes follow the public
config.json files of llava-hf/llava-1.5-7b-hf and ibm-granite/granite-speech-3.3-8b):

1. starts `loraplex serve` in a subprocess (dummy weights: a small launcher below builds the
   engine with load_format="dummy" and hands it to the server's own build_state);
2. drives it from this process with the official openai client, `--concurrency` streaming
   chat requests at a time, three workloads of `--requests` each: text only, half with one
   medium (a 640x480 PNG image / a 10 s WAV clip) and half text, all with one medium;
   `--runs` times each, reporting the median and the range of requests/s, output tokens/s and
   time to first token (p50, p90);
3. stops the server and times the encoder alone in-process: milliseconds per item for
   batches of 1, 4 and 16 items (the runner's encoder batch is at most 16).

Results print as a table and go to --out (JSON); record them in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))

CLIP_336 = {"do_resize": True, "size": {"shortest_edge": 336}, "do_center_crop": True,
            "crop_size": {"height": 336, "width": 336}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
LLAVA_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "torch_dtype": "bfloat16",
    "image_token_index": None,   # the benchmark tokenizer's <image> id, set below
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
    "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}
GRANITE_SPEECH_8B = {
    "architectures": ["GraniteSpeechForConditionalGeneration"], "model_type": "granite_speech",
    "torch_dtype": "bfloat16", "audio_token_index": None, "window_size": 15, "downsample_rate": 5,
    "tie_word_embeddings": True,
    "text_config": {"model_type": "granite", "vocab_size": 49160, "hidden_size": 4096, "intermediate_size": 12800,
                    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 10000000.0,
                    "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                    "logits_scaling": 16.0, "tie_word_embeddings": True},
    "encoder_config": {"input_dim": 160, "num_layers": 16, "hidden_dim": 1024, "feedforward_mult": 4,
                       "num_heads": 8, "dim_head": 128, "output_dim": 256, "context_size": 200, "max_pos_emb": 512,
                       "conv_kernel_size": 15, "conv_expansion_factor": 2},
    "projector_config": {"model_type": "blip_2_qformer", "hidden_size": 1024, "num_hidden_layers": 2,
                         "num_attention_heads": 16, "intermediate_size": 4096, "encoder_hidden_size": 1024,
                         "cross_attention_frequency": 1, "layer_norm_eps": 1e-12},
}
SMOKE_TEXT = {"vocab_size": 304, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
QUESTIONS = ["What is shown here?", "Describe it in detail.", "What happens next?", "Summarise it."]


def write_model(root: Path, kind: str, smoke: bool) -> Path:
    """A checkpoint directory with config.json, a tokenizer and preprocessor_config.json (no weights)."""
    from mm_models import AUDIO_TOKEN, GRANITE_SPEECH_FEATURES, IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE
    from models import CHAT_TEMPLATE, write_tiny_tokenizer

    config = json.loads(json.dumps(LLAVA_7B if kind == "llava" else GRANITE_SPEECH_8B))
    path = root / kind
    path.mkdir(parents=True)
    write_tiny_tokenizer(path, extra_special_tokens=(IMAGE_TOKEN, AUDIO_TOKEN),
                         chat_template=LLAVA_CHAT_TEMPLATE if kind == "llava" else CHAT_TEMPLATE)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    if kind == "llava":
        config["image_token_index"] = tokenizer.token_to_id(IMAGE_TOKEN)
        (path / "preprocessor_config.json").write_text(json.dumps(CLIP_336))
    else:
        config["audio_token_index"] = tokenizer.token_to_id(AUDIO_TOKEN)
        (path / "preprocessor_config.json").write_text(json.dumps(GRANITE_SPEECH_FEATURES))
    if smoke:
        config["text_config"].update(SMOKE_TEXT)
        if kind == "llava":
            config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4)
        else:
            config["encoder_config"].update(num_layers=2, hidden_dim=32, num_heads=4, dim_head=8, output_dim=12)
            config["projector_config"].update(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                              encoder_hidden_size=32)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def serve_dummy(argv: list[str]) -> None:
    """The server subprocess: `loraplex serve` with random weights."""
    import dataclasses

    import uvicorn

    from loraplex.core.async_engine import AsyncEngine
    from loraplex.server.app import build_app
    from loraplex.server.cli import build_parser
    from loraplex.server.serve import build_state, engine_config_from_args

    args = build_parser().parse_args(["serve", *argv])
    config = dataclasses.replace(engine_config_from_args(args), load_format="dummy")
    state = build_state(args, engine=AsyncEngine.from_config(config))
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="warning")


def media_parts(kind: str, count: int) -> list[dict]:
    from mm_models import png_bytes, random_audio, random_image, wav_bytes
    if kind == "llava":
        return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
            png_bytes(random_image(i, (640, 480)))).decode()}} for i in range(count)]
    return [{"type": "input_audio", "input_audio": {"data": base64.b64encode(
        wav_bytes(random_audio(i, 10.0))).decode(), "format": "wav"}} for i in range(count)]


async def drive(base_url: str, jobs: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    """Send every job (a message's content) as a streaming chat request; throughput and TTFT."""
    import openai

    gate, ttfts, tokens, failures = asyncio.Semaphore(concurrency), [], 0, []
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        async def one(content: list[dict]) -> None:
            nonlocal tokens
            async with gate:
                start = time.perf_counter()
                try:
                    stream = await client.chat.completions.create(
                        model="base", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                        temperature=0, stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True})
                    first = None
                    async for chunk in stream:
                        if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
                            first = time.perf_counter() - start
                        if chunk.usage is not None:
                            tokens += chunk.usage.completion_tokens
                    ttfts.append(first if first is not None else float("nan"))
                except openai.APIError as e:
                    failures.append(str(e))
        start = time.perf_counter()
        await asyncio.gather(*[one(c) for c in jobs])
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=10) if len(ttfts) > 1 else [float("nan")] * 9
    return {"requests_per_s": len(jobs) / elapsed, "tokens_per_s": tokens / elapsed, "ttft_p50_ms": q[4] * 1e3,
            "ttft_p90_ms": q[8] * 1e3, "failures": len(failures), "first_failure": failures[0] if failures else None}


def workloads(kind: str, requests: int) -> dict[str, list[list[dict]]]:
    media = media_parts(kind, 8)
    text = [[{"type": "text", "text": f"{QUESTIONS[i % 4]} Tell me about item {i}."}] for i in range(requests)]
    with_media = [[media[i % len(media)], t[0]] for i, t in enumerate(text)]
    return {"text": text, "mixed": [with_media[i] if i % 2 else text[i] for i in range(requests)],
            "media": with_media}


def run_server_phase(kind: str, model_dir: Path, args) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_args = [str(model_dir), "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
                  "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.concurrency),
                  "--log-level", "warning"] + (["--device", "cpu"] if args.smoke else [])
    server = subprocess.Popen([sys.executable, __file__, "--serve-dummy", json.dumps(serve_args)],
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                  [str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])))
    base_url = f"http://127.0.0.1:{port}"
    results: dict[str, list[dict]] = {}
    try:
        for _ in range(1800):
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            try:
                if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        loads = workloads(kind, args.requests)
        asyncio.run(drive(base_url, loads["mixed"][:4], 4, 4))   # warm-up
        for name, jobs in loads.items():
            results[name] = [asyncio.run(drive(base_url, jobs, args.concurrency, args.max_tokens))
                             for _ in range(args.runs)]
    finally:
        server.terminate()
        server.wait(120)
    return results


def encoder_times(kind: str, model_dir: Path, smoke: bool) -> dict[int, float]:
    """Milliseconds per item of the encoder alone, for batches of 1, 4 and 16 items."""
    import torch

    from loraplex.core.config import EngineConfig
    from loraplex.core.model_runner import ModelRunner
    from loraplex.core.multimodal.processor import MultimodalProcessor
    from loraplex.core.model_config import ModelConfig
    from mm_models import random_audio, random_image

    device = "cpu" if smoke else "cuda"
    runner = ModelRunner(EngineConfig(model=str(model_dir), load_format="dummy", device=device, max_model_len=2048,
                                      max_num_seqs=4, kv_cache_bytes=1 << 31))   # one 2,048-token 7B sequence: 1 GiB
    processor = MultimodalProcessor(ModelConfig.from_dir(model_dir), model_dir, max_model_len=2048)
    raw = random_image(0, (640, 480)) if kind == "llava" else (random_audio(0, 10.0), 16000)
    item = processor.items(raw, "the item", max_tokens=2048)[0].to(runner.device)
    encoder, out = runner.mm_encoder.encoder, {}
    with torch.inference_mode():
        for batch in (1, 4, 16):
            times = []
            for _ in range(6):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                encoder([item] * batch)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3 / batch)
            out[batch] = statistics.median(times[1:])
    return out


def summarise(kind: str, results: dict, encoder: dict) -> None:
    print(f"\n{kind}: medians (min-max) over {len(next(iter(results.values())))} runs")
    print(f"{'workload':<8} {'req/s':>18} {'out tok/s':>22} {'TTFT p50 ms':>22} {'TTFT p90 ms':>22} failures")
    for name, runs in results.items():
        cells = []
        for key in ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p90_ms"):
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"{name:<8} {cells[0]:>18} {cells[1]:>22} {cells[2]:>22} {cells[3]:>22} "
              f"{sum(r['failures'] for r in runs)}")
    print("encoder ms/item: " + ", ".join(f"batch {b}: {t:.2f}" for b, t in encoder.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["llava", "speech", "both"], default="both")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("gpu_multimodal.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, few requests")
    parser.add_argument("--serve-dummy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_dummy:
        serve_dummy(json.loads(args.serve_dummy))
        return
    if args.smoke:
        args.requests, args.concurrency, args.max_tokens, args.runs = 8, 4, 4, 1
    root = Path(tempfile.mkdtemp(prefix="bench-multimodal-"))
    report = {"date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()}}
    for kind in (["llava", "speech"] if args.model == "both" else ["llava" if args.model == "llava" else "speech"]):
        model_dir = write_model(root, kind, args.smoke)
        results = run_server_phase(kind, model_dir, args)
        encoder = encoder_times(kind, model_dir, args.smoke)
        summarise(kind, results, encoder)
        report[kind] = {"server": results, "encoder_ms_per_item": encoder}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
