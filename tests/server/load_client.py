"""The load tests' client: greedy completions over (model, prompt) jobs at a fixed concurrency,
each output checked against the expected text; returns one line per failure."""

from __future__ import annotations

import asyncio

import openai

from server.harness import API_KEY


async def run_completions(base_url: str, jobs: list, expected: dict, *, max_tokens: int,
                          concurrency: int) -> list[str]:
    failures: list[str] = []
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0,
                                  timeout=120) as client:
        async def one(model: str, prompt: str) -> None:
            async with gate:
                try:
                    out = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                          temperature=0)
                except openai.APIError as e:
                    failures.append(f"{model}/{prompt}: {e}")
                    return
                if out.choices[0].text != expected[(model, prompt)]:
                    failures.append(f"{model}/{prompt}: {out.choices[0].text!r} != {expected[(model, prompt)]!r}")
        await asyncio.gather(*[one(m, p) for m, p in jobs])
    return failures
