"""Running user code under a retry policy: attempts, timeouts, the TTL, ``RetryLater`` and aborts."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from essential.orchestration.dsl import RetryPolicy, StepContext
from essential.orchestration.errors import AbortPending, LeaseLost, RetryLater, StepFailed, StepTimeout
from essential.orchestration.models import Saga
from essential.orchestration.runner.control import Control

#: errors kept per stage (the latest ones)
MAX_RECORDED_ERRORS = 5


@dataclass
class Attempts:
    """Outcome of running one step or compensation under its retry policy."""

    ok: bool
    result: Any = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False
    duration_ms: float = 0.0
    deferred: RetryLater | None = None


def jsonable(value: Any) -> Any:
    """A step's result as stored: pydantic models become their JSON form."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


async def attempt(
    fn: Any, ctx: StepContext[Any], policy: RetryPolicy, timeout: float, *, saga: Saga, control: Control,
    bounded_by_ttl: bool,
) -> Attempts:  # fmt: skip
    """Call ``fn(ctx)`` until it succeeds, the policy's attempts run out, or the saga must stop.

    ``bounded_by_ttl``: a forward step's attempts end at the saga's deadline (a
    compensation's do not: it must run whatever the TTL says).
    """
    clock = control.clock
    outcome = Attempts(ok=False)
    started = time.perf_counter()
    while True:
        outcome.attempts += 1
        ctx.attempt = outcome.attempts
        ctx.attempted_at = clock.now()
        limit = timeout
        if bounded_by_ttl:
            remaining = (saga.deadline - clock.now()).total_seconds()
            limit = max(min(timeout, remaining), 0.0)
        retryable = True
        try:
            outcome.result = await asyncio.wait_for(fn(ctx), timeout=limit)
            outcome.ok = True
            outcome.timed_out = False
            break
        except asyncio.TimeoutError:
            # sticky: an attempt that timed out may have taken effect, whatever later ones say
            outcome.timed_out = True
            outcome.errors.append(str(StepTimeout(f"timed out after {limit:.3g}s")))
        except RetryLater as later:
            if outcome.timed_out:  # "no effect, run me later" cannot speak for the attempt that timed out
                outcome.errors.append(f"RetryLater after an attempt timed out (its outcome is unknown): {later}")
                break
            outcome.deferred = later
            break
        except StepFailed as exc:
            retryable = False
            outcome.errors.append(f"{type(exc).__name__}: {exc}")
        except (LeaseLost, AbortPending):
            raise  # replaced, or a transactional step's commit refused by an abort: stop, not an attempt
        except Exception as exc:  # a step's own failure (Essential's own errors too): retried by policy
            outcome.errors.append(f"{type(exc).__name__}: {exc}")
        if not retryable or outcome.attempts >= policy.attempts:
            break
        if bounded_by_ttl and control.ttl_passed(saga):
            break  # the TTL has passed: no point retrying
        await control.sleep(policy.delay(outcome.attempts))
        if bounded_by_ttl and control.abort_reason:
            break
    outcome.errors = outcome.errors[-MAX_RECORDED_ERRORS:]
    outcome.duration_ms = (time.perf_counter() - started) * 1000
    return outcome
