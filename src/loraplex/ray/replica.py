"""LoRAReplica: one whole loraplex engine as a Ray Serve replica.

A replica starts exactly like `loraplex serve` (server/serve.build_state: the engine,
the plugins, its own resolver chain, the ServingBackend, the static --lora-modules)
and serves the ingress's calls instead of HTTP. It never reaches inside the engine:
everything goes through the backend, as the HTTP routes do.

Routing by adapter uses Ray Serve's model multiplexing: the ingress sets the
request's adapter name as the multiplexed model id, and `generate` passes it through
a `serve.multiplexed` loader, which tells Ray's router which adapters this replica
holds (an LRU of max_num_models_per_replica names, set to max_cpu_loras so that it
tracks the engine's own CPU cache of adapters). The loader itself only asks the
backend, so resolution on first request, single-flight downloads and reloads of
evicted adapters are the server's code paths, unchanged.

The same LRU says whether a request found its adapter warm here: it is cold when the
adapter was loaded (into the LRU) after the request arrived. Requests that Ray routes
without the id (--ray-routing default) go through the loader too, so both routings are
counted alike in `loraplex_replica_requests_total{target}` (base, adapter_warm,
adapter_cold); adapters every replica loads at start-up (--lora-modules) count as warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from ray import serve

from loraplex.core.gc_heap import freeze_startup_heap
from loraplex.ray.directory import REPORT_INTERVAL_S
from loraplex.ray.wire import AdapterCard, ReplicaError, ReplicaSnapshot

logger = logging.getLogger("loraplex.ray")

REPORT_TIMEOUT_S = 2 * REPORT_INTERVAL_S


def adapter_failures_are_not_errors(record: logging.LogRecord) -> bool:
    """Ray logs every exception of a multiplexed loader at ERROR; ours are the client's 4xx
    (a name nobody has) or the resolver chain's, which logs source failures itself."""
    if record.levelno == logging.ERROR and record.getMessage().startswith("Failed to load model"):
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


class LoRAReplica:
    async def __init__(self, serve_args, directory, max_adapters: int) -> None:
        """serve_args: `loraplex serve`'s parsed flags (a namespace); directory: a handle to
        the ReplicaDirectory; max_adapters: adapters Ray's router counts per replica."""
        from prometheus_client import Counter

        from loraplex.server.serve import build_state

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("loraplex").setLevel(serve_args.log_level.upper())
        logging.getLogger("ray.serve").addFilter(adapter_failures_are_not_errors)
        self.state = build_state(serve_args)
        self.backend = self.state.backend
        # The same engine-side metrics as `loraplex serve` (resolutions, downloads, engine
        # counters), rendered into this replica's snapshots.
        self.state.metrics.attach_backend(self.backend)
        self.requests = Counter("loraplex_replica_requests", "generation requests this replica took, for "
                                "the base model or an adapter it held already (warm) or not (cold)",
                                ["target"], registry=self.state.metrics.registry)
        self._static_names = {name for name, _, _ in self.backend.static_adapters}
        await self.backend.startup()
        if self.state.multimodal is not None:   # the default adapter of each modality, by its name
            await self.state.multimodal.startup(self.backend)
            self._static_names |= set(self.state.multimodal.default_loras)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._directory = directory
        self._adapters_changed = asyncio.Event()

        async def load_adapter(name: str) -> float:
            await self.backend.lora_request_for(name)
            self._adapters_changed.set()   # report it now: /v1/models lists it at once
            return time.monotonic()        # when this replica came to hold it

        self._load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)
        self._reporter = asyncio.create_task(self._report_forever())
        freeze_startup_heap("Ray replica")
        logger.info("replica %s (pid %d) ready", self.replica_id, os.getpid())

    # ---- called by the ingress --------------------------------------------------------
    async def generate(self, model: str | None, prompt, sampling_params, request_id: str):
        """Stream the engine's RequestOutputs for one prompt; an error ends the stream as
        one ReplicaError. Cancelled by the ingress (client gone): the engine aborts it."""
        try:
            lora_request = await self._lora_request(model)
            outputs = self.backend.generate(prompt, sampling_params, request_id, lora_request)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    yield output
        except Exception as exc:   # noqa: BLE001 - every error goes back to the client
            yield ReplicaError.from_exception(exc)

    async def _lora_request(self, model: str | None):
        if self.backend.is_base_model(model):
            self.requests.labels("base").inc()
            return None
        warm = True
        if model not in self._static_names:
            arrived = time.monotonic()
            held_since = await self._load_adapter(model)   # Ray's bookkeeping of what this replica holds
            warm = held_since < arrived
        request = await self.backend.lora_request_for(model)
        if request is None:   # VLLM_SKIP_MODEL_NAME_VALIDATION: an unknown name is the base model
            self.requests.labels("base").inc()
        else:
            self.requests.labels("adapter_warm" if warm else "adapter_cold").inc()
        return request

    async def info(self) -> dict:
        return {"replica_id": self.replica_id, "pid": os.getpid(),
                "max_model_len": self.backend.max_model_len,
                "served_model_names": self.backend.served_model_names}

    def check_health(self) -> None:
        """Ray calls this periodically; a replica whose engine stopped is replaced."""
        if not self.backend.is_healthy():
            raise RuntimeError(f"replica {self.replica_id}: the engine has stopped")

    # ---- reports to the directory --------------------------------------------------------
    def snapshot(self) -> ReplicaSnapshot:
        import ray

        adapters = [AdapterCard(a.lora_name, a.lora_path, self.backend.parent_of(a.lora_name))
                    for a in self.backend.list_adapters()]
        return ReplicaSnapshot(self.replica_id, os.getpid(), ray.util.get_node_ip_address(), adapters,
                               self.state.metrics.render().decode(), self.backend.is_healthy())

    async def _report_forever(self) -> None:
        while True:
            self._adapters_changed.clear()
            try:
                # Bounded: a call to a directory that is being replaced waits for its successor.
                await asyncio.wait_for(self._directory.report.remote(self.snapshot()), REPORT_TIMEOUT_S)
            except Exception:   # noqa: BLE001 - the directory restarts; the next report rebuilds it
                logger.warning("replica %s: reporting to the directory failed", self.replica_id,
                               exc_info=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._adapters_changed.wait(), REPORT_INTERVAL_S)

    async def __del__(self) -> None:
        """Graceful stop (scale-down, redeploy, shutdown): leave the directory, stop the engine."""
        if not hasattr(self, "_reporter"):   # the constructor failed: Ray reports why
            return
        self._reporter.cancel()
        # The application's deletion may have stopped the directory already: do not wait for it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._directory.leave.remote(self.replica_id), REPORT_TIMEOUT_S)
        self.state.metrics.detach()
        await self.backend.shutdown()
