"""The job definition DSL.

A :class:`Job` is an ordered list of :class:`Step` s with a payload model, a
default TTL and a version.  Steps are declared with a decorator so a job reads
like the business process it implements::

    order = Job("order:fulfillment", version=1, ttl=300, payload=OrderPayload)

    @order.step(bucket="inventory.stocks", action="update")
    async def reserve_stock(ctx): ...

    @reserve_stock.compensation
    async def release_stock(ctx, reserved): ...

Beyond a straight chain (each durable across crashes and compensated correctly):

* **parallel groups** – steps declared inside ``with job.parallel("name"):`` run
  concurrently; when one fails, the members that succeeded are compensated
  (all of the group before the steps declared before it);
* **signals** – ``job.wait_for("identity.verified", timeout=...)`` waits for a
  named signal (``client.signal(saga_id, name, payload)``, Kafka, HTTP), stored
  when it arrives even if nothing runs the saga; ``@step.on_signal`` handles it;
* **durable timers** – ``job.sleep("cool_off", hours=6)``, or a step raising
  :class:`~essential.orchestration.errors.RetryLater` (``RetryLater(hours=6)``);
* **child sagas** – ``job.child("ship", job="logistic:shipment", payload=...)``
  starts another job and waits for it; aborting the parent aborts the child and
  compensating the parent compensates the child;
* **bucket locks** – ``@job.step(..., lock=Lock(keys=lambda ctx: ctx.payload.wallet))``
  holds a business key until the saga ends; a second saga on the key waits or
  fails fast (``on_conflict``).

A waiting saga (signal, timer, child, lock) holds no actor once it has waited
``linger`` seconds: it is checkpointed ``waiting`` and relaunched by the
supervisor when what it waits for happens.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from essential.orchestration.errors import InvalidPayload, field_problems
from essential.orchestration.states import Action

P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a step is tried and how long to wait in between (exponential)."""

    attempts: int = 3
    backoff: float = 0.05
    multiplier: float = 2.0
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")

    def delay(self, failed_attempts: int) -> float:
        return min(self.backoff * self.multiplier ** max(failed_attempts - 1, 0), self.max_backoff)


NO_RETRY = RetryPolicy(attempts=1)
COMPENSATION_RETRY = RetryPolicy(attempts=5, backoff=0.1, max_backoff=2.0)


@dataclass
class StepContext(Generic[P]):
    """What a step sees.  ``idempotency_key`` is stable across re-runs of the same stage."""

    saga_id: str
    job: str
    payload: P
    results: dict[str, Any]
    idempotency_key: str
    seq: int
    attempt: int = 1
    correlation_id: str | None = None
    traceparent: str | None = None
    #: the payload of the signal a ``wait_for`` step received (its handler reads it)
    signal: Any = None
    #: how often this step was deferred by ``RetryLater`` before this run
    deferred: int = 0
    #: the saga's TTL deadline, and the runner's clock when this attempt began
    deadline: datetime | None = None
    attempted_at: datetime | None = None
    #: a transactional step's (and its compensation's) database session: the transaction that
    #: also records the step's checkpoint.  Write with ``session=ctx.session`` through
    #: ``ctx.session.client`` (any database of the deployment's MongoDB); None for other steps.
    session: Any = None

    @property
    def remaining(self) -> float:
        """Seconds from this attempt's start until the saga's TTL runs out (inf when unknown)."""
        if self.deadline is None or self.attempted_at is None:
            return float("inf")
        return (self.deadline - self.attempted_at).total_seconds()

    @property
    def meta(self) -> dict[str, Any]:
        """Correlation metadata to forward to downstream services."""
        return {
            "saga": self.saga_id,
            "idempotency_key": self.idempotency_key,
            "correlation_id": self.correlation_id,
            "traceparent": self.traceparent,
        }


StepFn = Callable[[StepContext[Any]], Awaitable[Any]]
CompensateFn = Callable[[StepContext[Any], Any], Awaitable[Any]]
Predicate = Callable[[StepContext[Any]], bool]
#: seconds, or a function of the step's context returning seconds (or None: no limit, for timeouts)
Duration = float | Callable[[StepContext[Any]], float | None]
StepKind = Literal["task", "wait", "sleep", "child"]

#: buckets recorded on the stages of the built-in waiting steps
SIGNALS_BUCKET = "essential.signals"
TIMERS_BUCKET = "essential.timers"
SAGAS_BUCKET = "essential.sagas"


def seconds_of(duration: Duration | None, ctx: StepContext[Any]) -> float | None:
    raw = duration(ctx) if callable(duration) else duration
    if raw is None:
        return None  # e.g. a timeout the payload leaves open
    value = float(raw)
    if value < 0:
        raise ValueError(f"a duration must not be negative, got {value}")
    return value


@dataclass(frozen=True)
class Lock:
    """A semantic lock: the step holds these business keys of ``bucket`` until the saga ends.

    ``keys(ctx)`` returns one key or several (taken all at once, in one
    transaction with the step's write-ahead checkpoint, so the keys of one step
    never deadlock).  Sagas that lock keys in different steps, in opposite
    orders, can wait for each other: the saga whose wait would close such a
    cycle is refused at once (its step fails without effect and it compensates,
    releasing its locks), so the other goes on.  ``bucket`` defaults to the step's.
    A key held by another live saga makes the step wait (``on_conflict="wait"``,
    up to ``timeout`` seconds, else until the TTL) or fail at once without
    effect (``"fail"``).  Locks are released when the saga ends (completed or
    aborted, including by TTL); a parked saga keeps them.
    """

    keys: Callable[[StepContext[Any]], str | Iterable[str]]
    bucket: str | None = None
    on_conflict: Literal["wait", "fail"] = "wait"
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.on_conflict not in ("wait", "fail"):
            raise ValueError("Lock.on_conflict must be 'wait' or 'fail'")

    def claims(self, ctx: StepContext[Any], default_bucket: str) -> list[tuple[str, str]]:
        """``(bucket, key)`` pairs, sorted and without duplicates."""
        keys = self.keys(ctx)
        values = [keys] if isinstance(keys, str) else list(keys)
        bucket = self.bucket or default_bucket
        return sorted({(bucket, str(k)) for k in values if k is not None and str(k) != ""})


async def _signal_payload(ctx: StepContext[Any]) -> Any:
    """Default handler of a ``wait_for`` step: its result is the signal's payload."""
    return ctx.signal


async def _handled_by_runner(ctx: StepContext[Any]) -> Any:
    raise RuntimeError("this step is carried out by the runner itself")


@dataclass
class Step:
    """A plain step: runs ``run`` (with retries, a timeout and the TTL) and is undone by ``compensate``.

    The other kinds (:class:`WaitStep`, :class:`SleepStep`, :class:`ChildStep`) add what
    only they need; the runner has one handler per kind.
    """

    kind: ClassVar[StepKind] = "task"

    name: str
    bucket: str
    action: Action
    run: StepFn
    compensate: CompensateFn | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 30.0
    when: Predicate | None = None
    compensation_retry: RetryPolicy = COMPENSATION_RETRY
    #: parallel group the step belongs to (consecutive steps of one group run concurrently)
    group: str | None = None
    lock: Lock | None = None
    #: seconds a waiting step keeps its actor before the saga is checkpointed ``waiting`` (None: the runner's default)
    linger: float | None = None
    #: the step's (and its compensation's) writes go to the deployment's MongoDB in the
    #: transaction that records the step (``ctx.session``): applied exactly once, or not at all
    transactional: bool = False

    @property
    def waits(self) -> bool:
        """Whether the step may leave its stage open while the saga waits (a signal, a timer, a child)."""
        return self.kind != "task"

    def compensation(self, fn: CompensateFn) -> CompensateFn:
        """Decorator: register the step's compensation (receives ctx and the step's result)."""
        if self.kind in ("sleep", "child"):
            raise ValueError(f"step {self.name}: a {self.kind} step is compensated by the runner itself")
        self.compensate = fn
        return fn

    def on_signal(self, fn: StepFn) -> StepFn:
        """Decorator: handle the signal a ``wait_for`` step received (``ctx.signal``); its return is the result.

        Raise :class:`~essential.orchestration.errors.StepFailed` to refuse it (a rejected approval).
        """
        if self.kind != "wait":
            raise ValueError(f"step {self.name} does not wait for a signal")
        self.run = fn
        return fn


@dataclass
class WaitStep(Step):
    """``job.wait_for``: waits for a named signal, then runs its handler."""

    kind: ClassVar[StepKind] = "wait"

    signal: str = ""
    wait_timeout: Duration | None = None
    on_timeout: Literal["fail", "continue"] = "fail"


@dataclass
class SleepStep(Step):
    """``job.sleep``: a durable timer."""

    kind: ClassVar[StepKind] = "sleep"

    duration: Duration = 0.0


@dataclass
class ChildStep(Step):
    """``job.child``: starts another job as a child saga and waits for it to end."""

    kind: ClassVar[StepKind] = "child"

    child_job: str = ""
    child_payload: Callable[[StepContext[Any]], dict[str, Any]] | None = None
    child_ttl: float | None = None


class Job(Generic[P]):
    def __init__(
        self,
        name: str,
        *,
        payload: type[P],
        version: int = 1,
        ttl: float = 300.0,
        description: str = "",
    ) -> None:
        if ttl <= 0:
            raise ValueError("a job's default ttl must be positive")
        self.name = name
        self.version = version
        self.ttl = ttl
        self.payload_model = payload
        self.description = description
        self.steps: list[Step] = []
        self._group: str | None = None

    def __repr__(self) -> str:
        return f"Job({self.name!r} v{self.version}, {len(self.steps)} steps)"

    def _add(self, step: Step) -> Step:
        if any(s.name == step.name for s in self.steps):
            raise ValueError(f"job {self.name}: duplicate step name {step.name!r}")
        if self._group is not None:
            if step.kind != "task":
                raise ValueError(f"job {self.name}: a parallel group holds plain steps, not a {step.kind} step")
            if step.lock is not None:
                raise ValueError(f"job {self.name}: declare the lock on a step before parallel group {self._group!r}")
            if step.transactional:
                raise ValueError(f"job {self.name}: a transactional step cannot run in parallel group {self._group!r}")
            step.group = self._group
        self.steps.append(step)
        return step

    @contextmanager
    def parallel(self, name: str) -> Iterator["Job[P]"]:
        """Steps declared inside run concurrently, as one group::

            with shipment.parallel("allocate"):
                @shipment.step(...)
                async def reserve_cargo_space(ctx): ...
                @shipment.step(...)
                async def assign_vehicle(ctx): ...

        Members see the results of the steps before the group (not each
        other's).  Each is checkpointed as its own stage; the group's stages are
        written ahead in one transaction.  When a member fails, the others
        finish their current attempt, then the saga compensates every member
        that succeeded (latest seq first) and every step before the group.
        """
        if self._group is not None:
            raise ValueError("parallel groups do not nest")
        if any(s.group == name for s in self.steps):
            raise ValueError(f"job {self.name}: duplicate parallel group {name!r}")
        self._group = name
        try:
            yield self
        finally:
            self._group = None
        if not any(s.group == name for s in self.steps):
            raise ValueError(f"job {self.name}: parallel group {name!r} declares no step")

    def group_end(self, index: int) -> int:
        """Index after the last member of the parallel group that ``steps[index]`` belongs to."""
        group = self.steps[index].group
        end = index
        while end < len(self.steps) and group is not None and self.steps[end].group == group:
            end += 1
        return max(end, index + 1)

    def wait_for(
        self,
        signal: str,
        *,
        name: str | None = None,
        timeout: Duration | None = None,
        on_timeout: Literal["fail", "continue"] = "fail",
        when: Predicate | None = None,
        linger: float | None = None,
        bucket: str = SIGNALS_BUCKET,
        retry: RetryPolicy | None = None,
        handler_timeout: float = 30.0,
    ) -> Step:
        """Append a step that waits for the signal ``signal`` (stored even if it came earlier).

        ``timeout`` (seconds, or a function of ctx) runs from when the wait
        began; then ``on_timeout="fail"`` fails the step (the saga compensates)
        and ``"continue"`` succeeds it with ``{"timed_out": True}``.  Without a
        timeout the saga's TTL bounds the wait.  The result is the signal's
        payload, or what an ``@step.on_signal`` handler returns.  Each wait
        consumes one signal of that name, the oldest it has not consumed.
        """
        if on_timeout not in ("fail", "continue"):
            raise ValueError("on_timeout must be 'fail' or 'continue'")
        if not signal:
            raise ValueError("wait_for needs a signal name")
        return self._add(WaitStep(
            name=name or signal.replace(".", "_"), bucket=bucket, action=Action.WAIT, run=_signal_payload,
            retry=retry or NO_RETRY, timeout=handler_timeout, when=when, linger=linger,
            signal=signal, wait_timeout=timeout, on_timeout=on_timeout,
        ))  # fmt: skip

    def sleep(
        self,
        name: str,
        *,
        seconds: Duration = 0.0,
        minutes: float = 0.0,
        hours: float = 0.0,
        days: float = 0.0,
        when: Predicate | None = None,
        linger: float | None = None,
    ) -> Step:
        """Append a durable timer: the saga resumes after the delay, across crashes and restarts.

        ``seconds`` may be a function of ctx (e.g. from the payload); the wake-up
        time is fixed when the timer starts and survives restarts.
        """
        if callable(seconds):
            duration: Duration = seconds
        else:
            duration = float(seconds) + 60 * minutes + 3600 * hours + 86400 * days
            if duration <= 0:
                raise ValueError("sleep needs a positive delay")
        return self._add(SleepStep(
            name=name, bucket=TIMERS_BUCKET, action=Action.WAIT, run=_handled_by_runner, retry=NO_RETRY,
            when=when, linger=linger, duration=duration,
        ))  # fmt: skip

    def child(
        self,
        name: str,
        *,
        job: str,
        payload: Callable[[StepContext[Any]], dict[str, Any]],
        ttl: float | None = None,
        when: Predicate | None = None,
        linger: float | None = None,
        compensation_timeout: float = 600.0,
    ) -> Step:
        """Append a step that starts ``job`` as a child saga and waits for it to end.

        The child is created once (its idempotency key is derived from this
        saga and stage) with ``payload(ctx)``, this saga's correlation id, and a
        TTL capped by this saga's remaining TTL; the supervisor admits it like
        any pending saga.  The step succeeds with ``{"child", "job", "state",
        "results"}`` when the child completes and fails (nothing to undo: the
        child compensated itself) when it aborts.  Aborting or compensating this
        saga aborts the child, or compensates it if it had completed (a child's
        completion is provisional until its parent ends); a compensation waits up
        to ``compensation_timeout`` seconds per attempt for the child to end aborted.
        """
        return self._add(ChildStep(
            name=name, bucket=SAGAS_BUCKET, action=Action.CREATE, run=_handled_by_runner,
            retry=NO_RETRY, timeout=compensation_timeout, when=when, linger=linger,
            child_job=job, child_payload=payload, child_ttl=ttl,
        ))  # fmt: skip

    def step(
        self,
        *,
        bucket: str,
        action: Action | str,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        when: Predicate | None = None,
        lock: Lock | None = None,
        transactional: bool = False,
    ) -> Callable[[StepFn], Step]:
        """Decorator appending a step; steps run in declaration order.

        ``lock``: business keys the saga holds from this step until it ends (:class:`Lock`).
        ``transactional``: the step writes to the deployment's MongoDB with ``ctx.session``, and
        those writes commit in the transaction that records the step (so does its compensation):
        an effect applied exactly once, never at least once.  Its code may run again after a
        crash or a transient error, but only a run whose transaction committed left anything.
        """

        def register(fn: StepFn) -> Step:
            step = Step(
                name=name or fn.__name__,
                bucket=bucket,
                action=Action(action),
                run=fn,
                retry=retry or RetryPolicy(),
                timeout=timeout,
                when=when,
                lock=lock,
                transactional=transactional,
            )
            return self._add(step)

        return register

    def validate_payload(self, payload: Any) -> P:
        try:
            return self.payload_model.model_validate(payload)
        except ValidationError as exc:
            problems = [f"{field}: {reason}" for field, reason in field_problems(exc, "<payload>")]
            raise InvalidPayload(self.name, problems) from None
