"""Essential's custom metrics on Ray's metrics endpoint (Prometheus format, names prefixed ``ray_``).

Tags are low-cardinality only - job, state, bucket, action, placement, outbox,
topic, code, deployment (the Ray namespace, on the supervisor's gauges) - never
a saga id.  :data:`METRICS` lists every metric; the
Grafana dashboard in ``monitoring/`` charts them.

Where each metric is recorded:

* saga processes: a :class:`SagaMetrics` observer on the runner (stage
  durations, retries, compensations, completed/aborted/parked sagas);
* the supervisor: sagas started, restores, parks it decides, and the gauges
  (live saga actors, pending and parked sagas, outbox backlog and relay lag)
  refreshed by its sweep;
* the gateway: dead-lettered messages.

Why dedicated saga actors forward their points to one ``essential:metrics``
actor instead of recording them: Ray labels every series with the worker that
recorded it and keeps a counter's series for as long as the node lives, so a
process per saga would mean a series per saga - the cardinality this module
must never create.  Long-lived processes (hosts, supervisor, gateway) record
locally.  Nothing here may fail or slow a saga: every call swallows its errors.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import ray

from essential.actors.names import SINK_NAME
from essential.orchestration import Saga, SagaState, Stage
from essential.orchestration.states import Action

log = logging.getLogger("essential.metrics")

FLUSH_TIMEOUT = 3.0
FORWARD_EVERY = 0.5  # seconds a dedicated actor batches its points before sending them

#: seconds a stage takes: 5 ms .. 5 min
STAGE_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
#: seconds from start to the end of a saga: 50 ms .. 1 h
SAGA_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    def exported(self, name: str) -> list[str]:
        """The series names Prometheus sees (``ray_`` prefix, ``_total`` / histogram suffixes)."""
        base = f"ray_{name}"
        if self.kind == "counter":
            return [f"{base}_total"]
        if self.kind == "histogram":
            return [f"{base}_bucket", f"{base}_count", f"{base}_sum"]
        return [base]


METRICS: dict[str, Spec] = {
    "essential_sagas_started": Spec("counter", "sagas accepted (stored pending), by job", ("job",)),
    "essential_sagas_completed": Spec("counter", "sagas that ended completed", ("job",)),
    "essential_sagas_aborted": Spec("counter", "sagas that ended aborted (every completed step compensated)", ("job",)),
    "essential_sagas_parked": Spec("counter", "sagas parked for an operator", ("job",)),
    "essential_saga_duration_seconds": Spec(
        "histogram", "seconds from start to completed/aborted/parked", ("job", "state"), tuple(SAGA_BOUNDARIES)
    ),
    "essential_stage_duration_seconds": Spec(
        "histogram",
        "seconds a stage took including its retries; state is the stage's status (succeeded/failed)",
        ("job", "bucket", "action", "state"),
        tuple(STAGE_BOUNDARIES),
    ),
    "essential_step_retries": Spec("counter", "extra attempts of steps and compensations", ("job", "bucket", "action")),
    "essential_compensations": Spec(
        "counter", "compensation stages run; state succeeded or failed", ("job", "bucket", "state")
    ),
    "essential_restores": Spec("counter", "sagas restored by the supervisor from their last checkpoint", ("job",)),
    # gauges are one supervisor's view of its deployment (Ray namespace): several deployments may share a cluster
    "essential_live_saga_actors": Spec(
        "gauge", "sagas driven right now: own actor (dedicated) or task in a host (shared)", ("deployment", "placement")
    ),
    "essential_pending_sagas": Spec("gauge", "sagas waiting for admission", ("deployment",)),
    "essential_parked_sagas": Spec("gauge", "sagas parked now, waiting for an operator", ("deployment",)),
    "essential_outbox_backlog": Spec(
        "gauge", "outbox rows not yet acknowledged by Kafka (counted up to 10000)", ("deployment", "outbox")
    ),
    "essential_outbox_relay_lag_seconds": Spec(
        "gauge", "age in seconds of the oldest unsent outbox row (0 when empty)", ("deployment", "outbox")
    ),
    "essential_dead_letters": Spec("counter", "messages sent to a dead-letter topic", ("topic", "code")),
}

# -- the process's metric objects (created once, lazily) ------------------------------------
_objects: dict[str, Any] = {}
_lock = threading.Lock()


def _metric(name: str) -> Any:
    found = _objects.get(name)
    if found is not None:
        return found
    from ray.util import metrics as ray_metrics

    with _lock:
        found = _objects.get(name)
        if found is None:
            spec = METRICS[name]
            if spec.kind == "counter":
                found = ray_metrics.Counter(name, description=spec.description, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                found = ray_metrics.Gauge(name, description=spec.description, tag_keys=spec.tags)
            else:
                found = ray_metrics.Histogram(
                    name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags
                )
            _objects[name] = found
    return found


Point = tuple[str, float, dict[str, str]]  # (metric name, value, tags): what crosses to the sink


def apply(points: Iterable[Point]) -> None:
    """Record points in this process (inc for counters, set for gauges, observe for histograms)."""
    if not ray.is_initialized():
        return
    for name, value, tags in points:
        try:
            spec = METRICS[name]
            metric = _metric(name)
            tags = {k: str(tags.get(k) or "") for k in spec.tags}
            if spec.kind == "counter":
                if value > 0:
                    metric.inc(value, tags=tags or None)
            elif spec.kind == "gauge":
                metric.set(value, tags=tags or None)
            else:
                metric.observe(value, tags=tags or None)
        except Exception:  # noqa: BLE001 - metrics never break the caller
            log.debug("metric %s not recorded", name, exc_info=True)


# -- the observer of saga runners --------------------------------------------------------------
def stage_points(saga: Saga, stage: Stage) -> list[Point]:
    action = stage.action.value
    status = stage.status.value
    points: list[Point] = []
    if stage.meta.duration_ms is not None:
        points.append(("essential_stage_duration_seconds", stage.meta.duration_ms / 1000.0,
                       {"job": saga.job, "bucket": stage.bucket, "action": action, "state": status}))  # fmt: skip
    if stage.meta.retry_count:
        points.append(("essential_step_retries", float(stage.meta.retry_count),
                       {"job": saga.job, "bucket": stage.bucket, "action": action}))  # fmt: skip
    if stage.action == Action.COMPENSATE:
        points.append(("essential_compensations", 1.0, {"job": saga.job, "bucket": stage.bucket, "state": status}))
    return points


_ENDED = {
    SagaState.COMPLETED: "essential_sagas_completed",
    SagaState.ABORTED: "essential_sagas_aborted",
    SagaState.PARKED: "essential_sagas_parked",
}


def state_points(saga: Saga, state: SagaState) -> list[Point]:
    counter = _ENDED.get(state)
    if counter is None:
        return []
    points: list[Point] = [(counter, 1.0, {"job": saga.job})]
    elapsed = (saga.updatedAt - saga.createdAt).total_seconds()
    if elapsed >= 0:
        points.append(("essential_saga_duration_seconds", elapsed, {"job": saga.job, "state": state.value}))
    return points


class SagaMetrics:
    """A :class:`orchestration.RunnerObserver` that turns checkpoints into metric points.

    ``forward=True`` (dedicated saga actors) sends the points to the
    ``essential:metrics`` actor of ``namespace``, batched (at most one call per
    ``FORWARD_EVERY`` seconds, and one at the end); otherwise they are recorded
    in this process.  :meth:`flush` sends what is left and waits (briefly)
    until it arrived.  Points of a process killed mid-batch are lost: metrics
    are best effort, MongoDB is the record.
    """

    def __init__(self, *, forward: bool = False, namespace: str = "essential", on_event: Any = None) -> None:
        self.forward = forward
        self.namespace = namespace
        self.on_event = on_event
        self._buffer: list[Point] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sent: list[Any] = []
        self._sink: Any = None
        self._resolving: asyncio.Task | None = None

    def prepare(self) -> None:
        """Resolve the sink in the background (a GCS round trip), off the saga's critical path."""
        if self.forward and self._sink is None and self._resolving is None:
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())

    async def _resolve(self) -> None:
        try:
            self._sink = await asyncio.to_thread(sink, self.namespace)
        except Exception:  # noqa: BLE001 - no sink: record here
            log.debug("metrics sink unavailable", exc_info=True)
            self.forward = False
            points, self._buffer = self._buffer, []
            apply(points)

    def stage_finished(self, saga: Saga, stage: Stage) -> None:
        try:  # an observer must never fail the runner that calls it
            self._emit(stage_points(saga, stage))
            if self.on_event is not None:
                self.on_event("stage", saga, stage)
        except Exception:  # noqa: BLE001
            log.debug("stage observation failed", exc_info=True)

    def state_changed(self, saga: Saga, state: SagaState) -> None:
        try:
            self._emit(state_points(saga, state))
            if self.on_event is not None:
                self.on_event("state", saga, state)
        except Exception:  # noqa: BLE001
            log.debug("state observation failed", exc_info=True)

    def _emit(self, points: list[Point]) -> None:
        if not points:
            return
        if not self.forward:
            apply(points)
            return
        self._buffer.extend(points)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FORWARD_EVERY, self._send)

    def _send(self) -> None:
        self._timer = None
        if not self._buffer:
            return
        if self._sink is None:  # still resolving: keep the points for the next round
            self._timer = asyncio.get_running_loop().call_later(FORWARD_EVERY, self._send)
            return
        points, self._buffer = self._buffer, []
        try:
            self._sent.append(self._sink.record.remote(points))
        except Exception:  # noqa: BLE001 - no sink: record here rather than lose them
            log.debug("metrics sink unavailable; recording locally", exc_info=True)
            apply(points)

    async def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Send what is buffered and wait until it was recorded (a dedicated actor does this before it exits)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer and self._sink is None and self.forward:
            if self._resolving is None:
                self.prepare()
            try:
                await asyncio.wait_for(asyncio.shield(self._resolving), timeout)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001
                pass
        if self._sink is None and self._buffer:
            points, self._buffer = self._buffer, []
            apply(points)  # the sink never came: better a series of its own than nothing
        self._send()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sent, self._sent = self._sent, []
        if not sent:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), timeout)
        except Exception:  # noqa: BLE001
            log.debug("metrics flush incomplete", exc_info=True)


# -- the sink actor --------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class MetricsSink:
    """Records the points of short-lived saga actors in one long-lived process (one series per tag set)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.received = 0

    def __repr__(self) -> str:
        return f"MetricsSink({self.namespace})"

    async def record(self, points: list[Point]) -> int:
        apply(points)
        self.received += len(points)
        return self.received


_sinks: dict[str, Any] = {}


def sink(namespace: str) -> Any:
    """The namespace's metrics actor, created if missing (one GCS round trip per process)."""
    handle = _sinks.get(namespace)
    if handle is None:
        handle = MetricsSink.options(
            name=SINK_NAME, namespace=namespace, lifetime="detached", get_if_exists=True
        ).remote(namespace)
        _sinks[namespace] = handle
    return handle


# -- helpers for the supervisor and the gateway -------------------------------------------------
def saga_started(job: str) -> None:
    apply([("essential_sagas_started", 1.0, {"job": job})])


def saga_restored(job: str) -> None:
    apply([("essential_restores", 1.0, {"job": job})])


def saga_parked(job: str) -> None:
    """A park decided outside a runner (the supervisor's restore limit)."""
    apply([("essential_sagas_parked", 1.0, {"job": job})])


def saga_expired(saga: Saga) -> None:
    """An abort decided outside a runner (a queued saga's TTL ran out before admission)."""
    apply(state_points(saga, SagaState.ABORTED))


def dead_lettered(topic: str, code: str) -> None:
    apply([("essential_dead_letters", 1.0, {"topic": topic, "code": code})])


def gauge_live(dedicated: int, hosted: int, deployment: str = "essential", hosted_as: str = "shared") -> None:
    """``hosted``: sagas in host actors, labelled ``hosted_as`` (shared or pooled placement)."""
    apply([("essential_live_saga_actors", float(dedicated), {"deployment": deployment, "placement": "dedicated"}),
           ("essential_live_saga_actors", float(hosted), {"deployment": deployment, "placement": hosted_as})])  # fmt: skip


def gauge_pending(n: int, deployment: str = "essential") -> None:
    apply([("essential_pending_sagas", float(n), {"deployment": deployment})])


BACKLOG_CAP = 10_000  # the backlog gauge counts up to this many rows (a bounded read, even for a huge backlog)
GAUGE_REFRESH = 15.0  # seconds between the MongoDB reads behind the parked/outbox gauges
_refresh: dict[str, tuple[float, asyncio.Task | None]] = {}


async def observe_sweep(store: Any, placement: Any, pending: int) -> None:
    """The supervisor's gauges after a sweep.

    The live and pending gauges come from the sweep itself; the parked and
    outbox gauges need MongoDB reads, done in a background task at most every
    ``GAUGE_REFRESH`` seconds (one at a time) so they never hold a sweep up.
    """
    try:
        deployment = placement.settings.namespace
        gauge_live(len(placement.dedicated), len(placement.shared), deployment, "pooled" if placement.pooled else "shared")
        gauge_pending(pending, deployment)
        now = time.monotonic()
        last, task = _refresh.get(deployment, (0.0, None))
        if (task is not None and not task.done()) or now - last < GAUGE_REFRESH:
            return
        task = asyncio.get_running_loop().create_task(_refresh_gauges(store, deployment))
        _refresh[deployment] = (now, task)
    except Exception:  # noqa: BLE001 - gauges are best effort; the sweep goes on
        log.debug("sweep gauges not recorded", exc_info=True)


async def _refresh_gauges(store: Any, deployment: str) -> None:
    try:
        if deployment not in _sinks:  # have the sink up before the first saga actor needs it
            await asyncio.to_thread(sink, deployment)
    except Exception:  # noqa: BLE001
        log.debug("metrics sink not created", exc_info=True)
    try:
        parked = await store.sagas.count_documents({"state": SagaState.PARKED.value})
        points: list[Point] = [("essential_parked_sagas", float(parked), {"deployment": deployment})]
        for label, collection in (("events", store.db["outbox"]), ("commands", store.db["command_outbox"])):
            backlog, lag = await outbox_lag(collection)
            points.append(("essential_outbox_backlog", float(backlog), {"deployment": deployment, "outbox": label}))
            points.append(("essential_outbox_relay_lag_seconds", lag, {"deployment": deployment, "outbox": label}))
        apply(points)
    except Exception:  # noqa: BLE001
        log.debug("parked/outbox gauges not recorded", exc_info=True)


async def outbox_lag(collection: Any) -> tuple[int, float]:
    """Unsent rows and the age in seconds of the oldest one (what the relay still owes Kafka)."""
    from datetime import datetime, timezone

    owed = {"sent_at": None, "refused_at": None, "withdrawn_at": None}  # set-aside rows are reported, not owed
    backlog = await collection.count_documents(owed, limit=BACKLOG_CAP)
    if not backlog:
        return 0, 0.0
    oldest = await collection.find_one(owed, {"createdAt": 1}, sort=[("sent_at", 1), ("createdAt", 1)])
    created = (oldest or {}).get("createdAt")
    if created is None:
        return backlog, 0.0
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return backlog, max((datetime.now(timezone.utc) - created).total_seconds(), 0.0)
