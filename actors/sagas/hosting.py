"""Driving one saga inside a Ray process: shared by dedicated actors and host actors."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray

from essential.actors import logs
from essential.actors.metrics import SagaMetrics
from essential.actors.names import SUPERVISOR_NAME
from essential.actors.sagas.runtime import get_runtime
from essential.orchestration import LeaseLost, Saga, SagaRunner

log = logging.getLogger("essential.hosting")

def owner_label(where: str) -> str:
    """Lease owner: which node, process and actor drive the saga (shown by `essential status`)."""
    ctx = ray.get_runtime_context()
    return f"{where}@{ctx.get_node_id()[:12]}:{os.getpid()}"


async def drive(
    saga_id: str,
    settings: dict[str, Any],
    runners: dict[str, SagaRunner],
    pending_aborts: dict[str, str],
    where: str,
    *,
    forward_metrics: bool = False,
    orchestrated: bool = False,
) -> Ended:
    """Run the saga to a terminal/parked state; never raise (the supervisor restores on failure).

    Returns the saga as the runner left it (None when it did not finish here) and the
    lease epoch this run held, so the host can tell the supervisor, and its waiting
    callers, without a read — and the supervisor can tell a late notice of an earlier run.

    ``runners`` lets the hosting actor forward aborts to the live runner;
    ``pending_aborts`` holds aborts that arrived before the runner existed.
    ``forward_metrics``: a short-lived (dedicated) actor sends its metric points
    to the ``essential:metrics`` actor and waits for them before returning.
    """
    observer: SagaMetrics | None = None
    epoch: int | None = None
    logs.bind(saga=saga_id, where=where)  # this task's log context (each saga runs in its own task)
    try:
        runtime = await get_runtime(settings, ensure_indexes=False)
        conf = runtime.settings
        logs.configure(getattr(conf, "log_format", "kv"), getattr(conf, "log_level", "INFO"))
        observer = SagaMetrics(forward=forward_metrics, namespace=conf.namespace, on_event=logs.saga_event)
        observer.prepare()
        # a recorded saga (start/add/commit/abort) is hosted by essential.actors.sagas.recorded_hosting, not the job
        # runner; imported only when it may be one (a dedicated process pays every import itself)
        if not orchestrated:
            from essential.actors.sagas.recorded_hosting import drive_recorded, is_recorded

            if await is_recorded(runtime, saga_id):
                await drive_recorded(saga_id, runtime, runners, pending_aborts, owner_label(where), observer)
                return Ended(None, None)
        runner = SagaRunner(
            saga_id,
            store=runtime.store,
            registry=runtime.registry,
            owner=owner_label(where),
            observer=observer,
            fold_checkpoints=conf.fold_checkpoints,
        )
        runners[saga_id] = runner  # from here on, abort() reaches the runner directly
        if saga_id in pending_aborts:
            runner.request_abort(pending_aborts.pop(saga_id))
        try:
            return Ended(await runner.run(), runner.epoch)
        finally:
            epoch = runner.epoch or None
            await runtime.store.release(saga_id)
    except LeaseLost as exc:
        log.warning("%s", exc)
    except Exception:
        # Leave rather than linger: the supervisor restores the saga from its last
        # checkpoint (and parks it if that keeps failing).
        log.exception("saga %s: runner failed; the supervisor will restore it", saga_id)
    finally:
        runners.pop(saga_id, None)
        if observer is not None:
            await observer.flush()
    return Ended(None, epoch)


@dataclass(frozen=True)
class Ended:
    """How a run left its process: the saga as it ended (None: not finished here), and its lease epoch."""

    saga: Saga | None
    epoch: int | None


class EndNotice:
    """Tells the supervisor that a saga left this process, with the saga as it ended.

    The supervisor frees the slot (admitting the next pending saga now rather than
    at its next sweep) and hands the saga to callers waiting for it.  Fire and
    forget: a lost notice only means the sweep and the wait watch's slow poll do it.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._supervisor: Any = None

    def send(self, saga_id: str, ended: Ended) -> None:
        try:
            if self._supervisor is None:
                self._supervisor = ray.get_actor(SUPERVISOR_NAME, namespace=self.namespace)
            saga = ended.saga.model_dump(mode="json") if ended.saga else None
            self._supervisor.saga_ended.remote(saga_id, saga, ended.epoch)
        except Exception:  # noqa: BLE001 - no supervisor right now: its sweep covers it
            self._supervisor = None
