import pytest

from loraplex.server.app import build_app
from loraplex.server.backend import ServingBackend
from loraplex.server.state import ServerState
from adapters import write_peft_adapter
from server.fake_engine import FakeEngine
from server.harness import API_KEY, ServerThread


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Three tiny PEFT adapters on disk: {name: path}."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(write_peft_adapter(root / name, seed=i))
            for i, name in enumerate(("sql-lora", "chat-lora", "extra-lora"))}


class FakeChain:
    """A resolver chain over a dict (the real chain is exercised with the real engine)."""

    def __init__(self, known: dict[str, str]) -> None:
        self.known = known
        self.calls: list[str] = []
        self.listeners = []

    def add_listener(self, listener) -> None:
        self.listeners.append(listener)

    async def resolve(self, base_model_name, lora_name):
        import asyncio

        from loraplex.lora_request import LoRARequest, lora_id_for_name
        self.calls.append(lora_name)
        await asyncio.sleep(0.05)   # long enough for concurrent requests to pile up
        if lora_name == "source-down-lora":
            from loraplex.errors import ResolverError
            raise ResolverError("could not resolve 'source-down-lora': s3: connection refused")
        for listener in self.listeners:
            listener("fake", "found" if lora_name in self.known else "not_found", 0.05)
        if lora_name not in self.known:
            return None
        return LoRARequest(lora_name, lora_id_for_name(lora_name), self.known[lora_name], base_model_name)


@pytest.fixture(scope="module")
def fake_server(adapter_dirs, tmp_path_factory):
    """A server over the fake engine with sql-lora loaded statically, runtime updating
    on, an API key, and a resolver that knows 'resolvable-lora'."""
    extra = str(write_peft_adapter(tmp_path_factory.mktemp("resolvable") / "r", seed=9))
    engine = FakeEngine(step_delay_s=0.001)
    chain = FakeChain({"resolvable-lora": extra})

    def make_app():
        backend = ServingBackend(engine, served_model_names=["tiny-base"], model_path="/models/tiny",
                                 resolver_chain=chain, allow_runtime_lora_updating=True,
                                 max_model_len=engine.max_model_len)
        backend.static_adapters.append(("sql-lora", adapter_dirs["sql-lora"], None))
        return build_app(ServerState(backend, api_key=API_KEY, allow_runtime_lora_updating=True))

    with ServerThread(make_app) as server:
        server.engine = engine
        server.chain = chain
        server.resolvable_path = extra
        yield server
