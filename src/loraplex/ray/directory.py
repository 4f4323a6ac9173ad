"""ReplicaDirectory: the one place that knows what every replica serves.

Ray Serve routes each call to one replica and has no public way to ask all of
them, so replicas report instead: each sends a ReplicaSnapshot (its adapters, its
metrics, its pid) every REPORT_INTERVAL_S and right after it loads an adapter. The
ingress reads the fresh ones for /v1/models, /metrics and /health. A replica that
stops reporting (killed, or its node gone) drops out after EXPIRY_S; the replica Ray
starts in its place reports under its own id.

It is a Serve deployment of one replica in the same application, so it is created,
restarted and deleted with the application; if it restarts, the replicas' next
reports rebuild it within one interval.
"""

from __future__ import annotations

import time

from loraplex.ray.wire import ReplicaSnapshot

REPORT_INTERVAL_S = 1.0
EXPIRY_S = 5.0


class ReplicaDirectory:
    def __init__(self, expiry_s: float = EXPIRY_S) -> None:
        self.expiry_s = expiry_s
        self._latest: dict[str, tuple[float, ReplicaSnapshot]] = {}

    async def report(self, snapshot: ReplicaSnapshot) -> None:
        self._latest[snapshot.replica_id] = (time.monotonic(), snapshot)

    async def leave(self, replica_id: str) -> None:
        self._latest.pop(replica_id, None)

    async def snapshots(self) -> list[ReplicaSnapshot]:
        """The latest snapshot of every replica heard from within expiry_s, by replica id."""
        deadline = time.monotonic() - self.expiry_s
        for replica_id in [r for r, (at, _) in self._latest.items() if at < deadline]:
            del self._latest[replica_id]
        return [snapshot for _, snapshot in sorted(self._latest.values(), key=lambda e: e[1].replica_id)]
