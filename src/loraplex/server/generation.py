"""Turning engine output streams into per-choice deltas, shared by completions and chat.

The server's requests ask the engine for delta outputs (RequestOutputKind.DELTA, set in
sampling.py): each holds what is new since the previous one, which is what the HTTP layer
sends, so a step costs the same however long the prompt and the output are. One HTTP request
with a batch of prompts becomes one engine request per prompt, run concurrently
and merged; a request that stops early (client gone, error) is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loraplex.core.sampling_params import RequestOutputKind
from loraplex.lora_request import LoRARequest


@dataclass
class ChoiceDelta:
    """What one engine output added to one choice."""
    prompt_index: int
    index: int                       # the choice's index in the response
    text: str
    token_ids: list[int]
    logprobs: list | None            # one entry per new token: {token_id: logprob-like}
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class PromptRun:
    """Bookkeeping of one engine request (one prompt of a batch, all its n samples)."""
    prompt_index: int
    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list | None = None       # [None, {token_id: Logprob}, ...] when asked for
    num_output_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Seconds between the engine outputs that brought new tokens, one per output after the
    # first (vLLM's inter-token latency: a stall shows here, a mean per request hides it).
    token_gaps: list[float] = field(default_factory=list)
    finished_at: float | None = None
    finish_reasons: list[str] = field(default_factory=list)


def with_cache_salt(prompt, cache_salt: str | None):
    """The engine prompt carrying the request's cache_salt: prefix caching shares computed
    blocks only between requests of the same salt (vLLM's field)."""
    if cache_salt is None:
        return prompt
    if isinstance(prompt, dict):
        return {**prompt, "cache_salt": cache_salt}
    return {"prompt" if isinstance(prompt, str) else "prompt_token_ids": prompt, "cache_salt": cache_salt}


async def run_prompt(backend: Any, run: PromptRun, prompt: str | list[int], sampling_params: Any,
                     lora_request: LoRARequest | None, n: int) -> AsyncIterator[ChoiceDelta]:
    """Stream the deltas of one engine request; abort it if the consumer stops early."""
    if sampling_params.output_kind != RequestOutputKind.DELTA:
        raise ValueError("run_prompt reads delta outputs: build the SamplingParams with "
                         "output_kind=RequestOutputKind.DELTA (server/sampling.py does)")
    finished = False
    try:
        async for out in backend.generate(prompt, sampling_params, run.request_id, lora_request):
            if not run.prompt_token_ids and out.prompt_token_ids is not None:
                run.prompt_token_ids = list(out.prompt_token_ids)
            if getattr(out, "prompt", None) is not None:
                run.prompt = out.prompt
            if getattr(out, "prompt_logprobs", None) is not None:
                run.prompt_logprobs = out.prompt_logprobs
            if any(comp.token_ids for comp in out.outputs):
                now = time.perf_counter()
                if run.last_token_at is not None:
                    run.token_gaps.append(now - run.last_token_at)
                run.last_token_at = now
            for comp in out.outputs:
                new_ids = list(comp.token_ids)
                if not new_ids and not comp.text and comp.finish_reason is None:
                    continue
                run.num_output_tokens += len(new_ids)
                if new_ids and run.first_token_at is None:
                    run.first_token_at = run.last_token_at
                if comp.finish_reason is not None:
                    run.finish_reasons.append(comp.finish_reason)
                yield ChoiceDelta(run.prompt_index, run.prompt_index * n + comp.index, comp.text or "",
                                  new_ids, comp.logprobs, comp.finish_reason,
                                  getattr(comp, "stop_reason", None))
            finished = bool(out.finished)
    finally:
        run.finished_at = time.perf_counter()
        if not finished:
            await asyncio.shield(backend.abort(run.request_id))


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they arrive; closing this closes them all."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield item
        finally:
            await iterators[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it: AsyncIterator) -> None:
        try:
            async for item in it:
                await queue.put((item, None))
            await queue.put((done, None))
        except Exception as e:  # delivered to the consumer, which re-raises it
            await queue.put((done, e))

    tasks = [asyncio.create_task(pump(it)) for it in iterators]
    remaining = len(tasks)
    try:
        while remaining:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in iterators:
            await it.aclose()


async def prepend(first, rest: AsyncIterator) -> AsyncIterator:
    """`first`, then the items of `rest`; closing this closes `rest`."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def start_stream(deltas: AsyncIterator, wait) -> AsyncIterator:
    """Wait for the first delta before a stream's 200 goes out, so requests the engine
    rejects (prompt too long, bad token ids) get a proper 4xx status rather than an
    error event. `wait(coro)` awaits it unless the client disconnects."""
    try:
        first = await wait(deltas.__anext__())
    except BaseException:
        await deltas.aclose()
        raise
    return prepend(first, deltas)

