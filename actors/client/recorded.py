"""Recorded sagas from Python: ``EssentialClient().recorded``."""
from __future__ import annotations

from typing import Any

import ray

from essential.orchestration.errors import raise_for_error
from essential.orchestration.models import Saga
from essential.orchestration.recorded import RECORDED


class RecordedClient:
    """Recorded sagas from Python: ``EssentialClient().recorded``.

    >>> saga = client.recorded.start(ttl=60, job="order:checkout")
    >>> client.recorded.add(saga.id, bucket="shop.orders", action="INSERT_MANY",
    ...                     req={"documents": docs}, res={"insertedIds": ids})
    >>> client.recorded.commit(saga.id)          # or .abort(saga.id): the stages are undone
    """

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def _call(self, op: str, *args: Any) -> dict[str, Any]:
        return raise_for_error(ray.get(self.supervisor.recorded.remote(op, *args)))

    def start(
        self, ttl: float, *, job: str | None = None, correlation_id: str | None = None,
        idempotency_key: str | None = None, id: str | None = None,
    ) -> Saga:  # fmt: skip
        body = {k: v for k, v in {"ttl": ttl, "job": job, "correlation_id": correlation_id,
                                  "idempotency_key": idempotency_key, "id": id}.items() if v is not None}  # fmt: skip
        return Saga.model_validate(self._call("start", body)["saga"])

    def add(
        self, saga_id: str, *, bucket: str, action: str, req: Any = None, res: Any = None,
        meta: dict[str, Any] | None = None, key: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Record a stage; returns it (JSON-safe, with its ``seq`` and ``undo``).  ``key`` dedupes retries."""
        body = {"bucket": bucket, "action": action, "req": req, "res": res, "meta": meta or {}}
        if key is not None:
            body["key"] = key
        return self._call("add", saga_id, body)["stage"]

    def commit(self, saga_id: str) -> Saga:
        return Saga.model_validate(self._call("commit", saga_id)["saga"])

    def abort(self, saga_id: str, reason: str = "aborted by client", *, wait: float | None = None) -> Saga:
        """Compensate the recorded stages; waits up to ``wait`` s (default ESSENTIAL_RECORDED_ABORT_WAIT)."""
        return Saga.model_validate(self._call("abort", saga_id, reason, wait)["saga"])

    def get(self, saga_id: str) -> Saga:
        return Saga.model_validate(self._call("get", saga_id)["saga"])

    def stages(self, saga_id: str) -> list[dict[str, Any]]:
        return self._call("stages", saga_id)["stages"]

    def list(self, *, state: str | None = None, job: str | None = None, limit: int = 50) -> list[Saga]:
        filters = {"kind": RECORDED, "state": state, "job": job}
        return [Saga.model_validate(s) for s in self._call("list", filters, limit)["sagas"]]

    def count(self, *, state: str | None = None, job: str | None = None) -> int:
        return int(self._call("count", {"kind": RECORDED, "state": state, "job": job})["total"])
