"""What travels between the ingress, the replicas and the directory (all plain, picklable data).

Errors cross the process boundary as a ReplicaError record rather than as a raised
exception: Ray would wrap a raised one in RayTaskError (its message a remote
traceback), and our own exceptions do not all survive pickling. The replica turns
the exception into (status, OpenAI error body) with the server's one mapping
(server/errors.exception_to_body); the ingress raises it again as an HTTPError with
that status, so a client sees exactly what `loraplex serve` would have sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.server.errors import HTTPError, exception_to_body


@dataclass(frozen=True)
class AdapterRoute:
    """What the ingress knows about a request's adapter: its name, and whether every replica
    serves it already (--lora-modules), so that Ray may send the request anywhere."""
    name: str
    on_every_replica: bool = False

    @property
    def lora_name(self) -> str:   # read like a LoRARequest by code that only logs it
        return self.name


@dataclass(frozen=True)
class ReplicaError:
    """An exception raised in a replica, as the HTTP status and error body it maps to."""
    status: int
    message: str
    param: str | None = None
    error_type: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ReplicaError:
        status, body = exception_to_body(exc)
        error = body["error"]
        return cls(status, error["message"], error["param"], error["type"])

    def to_exception(self) -> HTTPError:
        return HTTPError(self.status, self.message, param=self.param, error_type=self.error_type)


@dataclass(frozen=True)
class AdapterCard:
    """One adapter a replica serves, for the cluster's /v1/models."""
    name: str
    path: str
    parent: str


@dataclass
class ReplicaSnapshot:
    """What a replica reports to the directory, every REPORT_INTERVAL_S and after it
    loads an adapter: who it is, what it serves, and its Prometheus metrics as text."""
    replica_id: str
    pid: int
    node_ip: str
    adapters: list[AdapterCard] = field(default_factory=list)
    metrics_text: str = ""
    healthy: bool = True
