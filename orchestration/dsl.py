"""The job definition DSL.

A :class:`Job` is an ordered list of :class:`Step` s with a payload model, a
default TTL and a version.  Steps are declared with a decorator so a job reads
like the business process it implements::

    order = Job("order:fulfillment", version=1, ttl=300, payload=OrderPayload)

    @order.step(bucket="inventory.stocks", action="update")
    async def reserve_stock(ctx): ...

    @reserve_stock.compensation
    async def release_stock(ctx, reserved): ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import InvalidPayload
from .states import Action

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


@dataclass
class Step:
    name: str
    bucket: str
    action: Action
    run: StepFn
    compensate: CompensateFn | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 30.0
    when: Predicate | None = None
    compensation_retry: RetryPolicy = COMPENSATION_RETRY

    def compensation(self, fn: CompensateFn) -> CompensateFn:
        """Decorator: register the step's compensation (receives ctx and the step's result)."""
        self.compensate = fn
        return fn


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

    def __repr__(self) -> str:
        return f"Job({self.name!r} v{self.version}, {len(self.steps)} steps)"

    def step(
        self,
        *,
        bucket: str,
        action: Action | str,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        when: Predicate | None = None,
    ) -> Callable[[StepFn], Step]:
        """Decorator appending a step; steps run in declaration order."""

        def register(fn: StepFn) -> Step:
            step = Step(
                name=name or fn.__name__,
                bucket=bucket,
                action=Action(action),
                run=fn,
                retry=retry or RetryPolicy(),
                timeout=timeout,
                when=when,
            )
            if any(s.name == step.name for s in self.steps):
                raise ValueError(f"job {self.name}: duplicate step name {step.name!r}")
            self.steps.append(step)
            return step

        return register

    def validate_payload(self, payload: Any) -> P:
        try:
            return self.payload_model.model_validate(payload)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in err['loc']) or '<payload>'}: {err['msg']}"
                for err in exc.errors()
            ]
            raise InvalidPayload(self.name, problems) from None
