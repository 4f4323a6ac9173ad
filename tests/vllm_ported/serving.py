"""A loraplex server as vLLM's OpenAI serving tests set theirs up: built from the
command line (`loraplex serve MODEL --enable-lora`) and the environment of the moment,
over an engine that only records what it is asked (vLLM's tests use a MagicMock)."""

from __future__ import annotations

import asyncio

from loraplex.lora_request import LoRARequest
from loraplex.server.app import build_app
from loraplex.server.cli import build_parser
from loraplex.server.serve import build_state
from server.fake_engine import FakeEngine
from server.harness import ServerThread


class RecordingEngine(FakeEngine):
    """add_lora succeeds for any path (no files are read) except for adapters named in
    `failing`; generate records the LoRARequest it was given."""

    def __init__(self, failing: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.failing = failing
        self.add_lora_calls: list[LoRARequest] = []
        self.generate_calls: list[LoRARequest | None] = []

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        self.add_lora_calls.append(lora_request)
        await asyncio.sleep(0)
        if lora_request.lora_name in self.failing:
            raise ValueError(f"Simulated failure adding LoRA: {lora_request.lora_name}")
        return True

    def generate(self, prompt, params, request_id, lora_request=None):
        self.generate_calls.append(lora_request)
        return super().generate(prompt, params, request_id, lora_request=lora_request)


def start_server(model_name: str, engine: FakeEngine) -> ServerThread:
    args = build_parser().parse_args(["serve", model_name, "--enable-lora"])
    return ServerThread(lambda: build_app(build_state(args, engine=engine))).start()
