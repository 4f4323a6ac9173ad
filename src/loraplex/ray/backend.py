"""RayBackend: the ServingBackend of the ingress, whose engines are the replicas.

The HTTP layer (routes, errors, streaming, auth, metrics) is the server's own,
unchanged: it only talks to a ServingBackend. This subclass answers the same calls
from a cluster:

- which adapter a request uses: only its name (an AdapterRoute) — the replica that
  gets the request resolves it through its own resolver chain;
- generate: a streaming call to the replicas' deployment, with the adapter name as
  Ray Serve's multiplexed model id, so Ray sends it to a replica that already holds
  that adapter (base-model requests, and adapters every replica loaded at start-up,
  go anywhere); an error in the replica comes back with the status it maps to;
- a replica that dies under a request: that request fails with 503 at once (Ray
  restarts the replica; new requests go to the living ones);
- what is served (/v1/models, /health, the replicas' metrics): the directory's view,
  refreshed in the background every REFRESH_INTERVAL_S;
- runtime loading by path (/v1/load_lora_adapter, unload): refused, see load_adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from loraplex.errors import EngineDeadError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.ray.directory import REPORT_INTERVAL_S
from loraplex.ray.wire import AdapterCard, AdapterRoute, ReplicaError, ReplicaSnapshot
from loraplex.resolvers.names import check_adapter_name
from loraplex.server.backend import ServingBackend, model_not_found
from loraplex.server.errors import HTTPError

logger = logging.getLogger("loraplex.ray")

REFRESH_INTERVAL_S = REPORT_INTERVAL_S / 2

RUNTIME_LOADING_REFUSED = (
    "loading adapters by path at runtime is not available with Ray replicas: each replica "
    "resolves adapters on its own, on their first request, so put the adapter where the "
    "resolver chain finds it (the shared S3 prefix, the Hub, or VLLM_LORA_RESOLVER_CACHE_DIR on "
    "every node) and request it by name, or list it in --lora-modules to load it on every replica")


class RayBackend(ServingBackend):
    def __init__(self, replicas: Any, directory: Any, *, tokenizer: Any, served_model_names: list[str],
                 model_path: str, static_adapter_names: list[str], allow_runtime_lora_updating: bool,
                 enable_lora: bool, skip_model_name_validation: bool = False,
                 route_by_adapter: bool = True) -> None:
        """replicas, directory: DeploymentHandles of the LoRAReplica and ReplicaDirectory
        deployments. route_by_adapter=False leaves routing to Ray's default (for comparison)."""
        super().__init__(None, served_model_names=served_model_names, model_path=model_path,
                         allow_runtime_lora_updating=allow_runtime_lora_updating, enable_lora=enable_lora,
                         skip_model_name_validation=skip_model_name_validation)
        self.replicas = replicas
        self.directory = directory
        self._tokenizer = tokenizer
        self.static_adapter_names = set(static_adapter_names)
        self.route_by_adapter = route_by_adapter
        self.snapshots: list[ReplicaSnapshot] = []
        self._cards: dict[str, AdapterCard] = {}  # every adapter some replica serves, by name
        self._responses: dict[str, Any] = {}    # request id -> its DeploymentResponseGenerator
        self._refresher: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def startup(self) -> None:
        """Learn the replicas' context length (waits for the first replica to be up)."""
        info = await self.replicas.info.remote()
        self.max_model_len = info["max_model_len"]
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def shutdown(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()

    async def refresh(self) -> None:
        self.snapshots = await self.directory.snapshots.remote()
        cards: dict[str, AdapterCard] = {}
        for snapshot in self.snapshots:   # an adapter on several replicas: the first one's card
            for card in snapshot.adapters:
                cards.setdefault(card.name, card)
        self._cards = cards

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                await self.refresh()
            except Exception:   # noqa: BLE001 - keep the last view; the directory restarts
                logger.warning("reading the replica directory failed", exc_info=True)

    def is_healthy(self) -> bool:
        return any(s.healthy for s in self.snapshots)

    def engine_stats(self) -> dict[str, float]:
        return {}   # the replicas' own metrics carry them (cluster_metrics.ReplicaMetricsCollector)

    # ---- names ----------------------------------------------------------------------------
    def list_adapters(self) -> list[LoRARequest]:
        return [LoRARequest(c.name, lora_id_for_name(c.name), c.path) for c in self._cards.values()]

    def get_adapter(self, name: str) -> LoRARequest | None:
        card = self._cards.get(name)
        return LoRARequest(card.name, lora_id_for_name(card.name), card.path) if card else None

    def parent_of(self, name: str) -> str:
        card = self._cards.get(name)
        return card.parent if card else self.base_model_name

    async def lora_request_for(self, model: str | None) -> AdapterRoute | None:
        if self.is_base_model(model):
            return None
        if model in self.static_adapter_names:
            return AdapterRoute(model, on_every_replica=True)
        if self.skip_model_name_validation and model not in self._cards:
            return None   # VLLM_SKIP_MODEL_NAME_VALIDATION: a name no replica serves is the base model
        if not (self.enable_lora and self.allow_runtime_lora_updating):
            raise model_not_found(model)
        check_adapter_name(model)   # refuse unsafe names here, before any replica sees them
        return AdapterRoute(model)

    # ---- management -------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str, *, base_model_name: str | None = None,
                           load_inplace: bool = False) -> LoRARequest:
        raise HTTPError(501, RUNTIME_LOADING_REFUSED)

    async def unload_adapter(self, name: str) -> None:
        raise HTTPError(501, RUNTIME_LOADING_REFUSED)

    # ---- generation -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(self, prompt: str | list[int], sampling_params: Any, request_id: str,
                       lora_request: AdapterRoute | None) -> AsyncIterator:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import RayServeException

        name = lora_request.name if lora_request is not None else None
        routed = name is not None and self.route_by_adapter and not lora_request.on_every_replica
        handle = self.replicas.options(stream=True, multiplexed_model_id=name if routed else "")
        response = handle.generate.remote(name, prompt, sampling_params, request_id)
        self._responses[request_id] = response
        ended = False
        try:
            async for item in response:
                if isinstance(item, ReplicaError):
                    raise item.to_exception()
                yield item
            ended = True
        except RayActorError as exc:
            raise EngineDeadError(
                f"the replica serving this request stopped ({type(exc).__name__}); retry the request: "
                f"Ray restarts the replica and new requests go to the replicas still running") from exc
        except RayServeException as exc:   # no replica could take it (none running, queues full)
            raise EngineDeadError(f"no replica could take this request ({type(exc).__name__}: {exc}); "
                                  f"retry it later") from exc
        finally:
            self._responses.pop(request_id, None)
            if not ended:   # left early (client gone, error): stop the replica's work too
                response.cancel()

    async def abort(self, request_id: str) -> None:
        """Cancel the call: the replica's generate is cancelled and its engine aborts the request."""
        response = self._responses.pop(request_id, None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.cancel()
