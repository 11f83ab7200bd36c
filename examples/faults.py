"""Failure injection for demos, tests and benchmarks, driven by the job's payload.

* ``fail_at`` – the named step fails on every attempt with a *retryable* error,
  so it exhausts its retry policy and the saga compensates what already ran;
* ``crash_after`` – the named step applies its effect and then its first attempt
  fails, as if the process died before the checkpoint; the retry must find the
  effect in the service's ledger and not apply it again;
* ``fail_undo_at`` – the named step's compensation fails on every attempt, so
  the saga ends ``parked`` for an operator;
* ``slow_ms`` – every step waits this long first (TTL expiry and abort demos).

:func:`inject_faults` wraps a finished job's steps, so the step functions in
``examples.jobs`` stay plain DSL.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from essential import CompensateFn, Job, StepContext, StepFn


class InjectedFault(RuntimeError):
    """Raised by a step named in ``fail_at`` (retryable, so the retry policy is exercised)."""


class SimulatedCrash(RuntimeError):
    """Raised once by a step named in ``crash_after``, after its effect was applied."""


class FaultInjection(BaseModel):
    """Base of the example payloads: business fields come from subclasses."""

    model_config = ConfigDict(extra="forbid")
    step_names: ClassVar[frozenset[str]] = frozenset()

    fail_at: str | None = Field(None, description="step that fails on every attempt (then the saga compensates)")
    crash_after: str | None = Field(None, description="step whose first attempt fails after applying its effect")
    fail_undo_at: str | None = Field(None, description="step whose compensation always fails (the saga parks)")
    slow_ms: int = Field(0, ge=0, le=600_000, description="delay before every step, in milliseconds")

    @model_validator(mode="after")
    def _known_steps(self) -> "FaultInjection":
        for field in ("fail_at", "crash_after", "fail_undo_at"):
            name = getattr(self, field)
            if name is not None and self.step_names and name not in self.step_names:
                steps = ", ".join(sorted(self.step_names))
                raise ValueError(f"{field}={name!r} is not a step of this job; steps: {steps}")
        return self


def _forward(name: str, fn: StepFn) -> StepFn:
    @functools.wraps(fn)
    async def run(ctx: StepContext[Any]) -> Any:
        faults: FaultInjection = ctx.payload
        if faults.slow_ms:
            await asyncio.sleep(faults.slow_ms / 1000)
        if faults.fail_at == name:
            raise InjectedFault(f"step {name} failed on purpose (payload fail_at), attempt {ctx.attempt}")
        result = await fn(ctx)
        if faults.crash_after == name and ctx.attempt == 1:
            raise SimulatedCrash(f"step {name} applied its effect, then 'crashed' before the checkpoint (crash_after)")
        return result

    return run


def _undo(name: str, fn: CompensateFn) -> CompensateFn:
    @functools.wraps(fn)
    async def run(ctx: StepContext[Any], result: Any) -> Any:
        if ctx.payload.fail_undo_at == name:
            raise InjectedFault(f"compensation of step {name} failed on purpose (payload fail_undo_at)")
        return await fn(ctx, result)

    return run


def inject_faults(job: Job[Any]) -> Job[Any]:
    """Make every step of ``job`` obey the payload's fault fields, and let the payload check their names."""
    for step in job.steps:
        step.run = _forward(step.name, step.run)
        if step.compensate is not None:
            step.compensate = _undo(step.name, step.compensate)
    job.payload_model.step_names = frozenset(step.name for step in job.steps)
    return job
