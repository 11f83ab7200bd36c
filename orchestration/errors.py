"""Typed errors.  Each message tells the caller what to do about it."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class EssentialError(Exception):
    """Base of every error Essential raises on purpose.

    Picklable whatever its constructor takes, so it crosses a process boundary
    (a Ray actor's reply) as itself, with its message and attributes.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_restore, (type(self), str(self)), self.__dict__)


def _restore(cls: type[EssentialError], message: str) -> EssentialError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


class InvalidRequest(EssentialError, ValueError):
    """A start/abort request that cannot be accepted as given."""


class UnknownJob(InvalidRequest):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        super().__init__(
            f"unknown job {name!r}; registered jobs: {', '.join(sorted(known)) or 'none'}"
            " (add its module to ESSENTIAL_JOB_MODULES)"
        )


class JobVersionMissing(EssentialError):
    def __init__(self, name: str, version: int, known: list[int]):
        self.name, self.version = name, version
        super().__init__(
            f"job {name!r} version {version} is not registered (have {known}); "
            "deploy the module that defines it so in-flight sagas can resume"
        )


class JobModuleMissing(EssentialError):
    """A module named in the job modules setting cannot be imported: a deployment mistake, not a saga's."""

    def __init__(self, module: str, reason: str):
        self.module = module
        super().__init__(
            f"job module {module!r} (ESSENTIAL_JOB_MODULES) cannot be imported: {reason}; "
            "install it where Essential runs or fix the setting"
        )


class InvalidPayload(InvalidRequest):
    def __init__(self, job: str, problems: list[str]):
        self.job, self.problems = job, problems
        super().__init__(f"payload rejected by job {job!r}: " + "; ".join(problems))


class IdempotencyKeyReused(InvalidRequest):
    """A start repeated with an idempotency key already used for a *different* request."""

    def __init__(self, key: str, saga_id: str):
        self.key, self.saga_id = key, saga_id
        super().__init__(
            f"idempotency key {key!r} was already used by saga {saga_id} with a different job, payload or ttl; "
            "repeat the original request to get that saga, or use a new key"
        )


class SagaNotFound(EssentialError, LookupError):
    def __init__(self, saga_id: str):
        self.saga_id = saga_id
        super().__init__(f"no saga with id {saga_id!r}")


class IllegalTransition(EssentialError):
    """An operation the saga's current state forbids (e.g. commit after abort)."""


class LeaseLost(EssentialError):
    """Another actor took over this saga (higher epoch); the stale one must stop."""

    def __init__(self, saga_id: str, epoch: int):
        self.saga_id, self.epoch = saga_id, epoch
        super().__init__(f"saga {saga_id}: lease epoch {epoch} is stale; stopping")


class AbortPending(EssentialError):
    """A forward write-ahead refused because the saga has a durable abort request.

    The step is then never started: an abort is honoured between steps even when
    the runner learns of it only from MongoDB (a parent aborting its child saga)."""

    def __init__(self, saga_id: str, reason: str):
        self.saga_id, self.reason = saga_id, reason
        super().__init__(f"saga {saga_id}: abort requested ({reason}); the next step is not started")


class StepTimeout(EssentialError, TimeoutError):
    pass


class StepFailed(EssentialError):
    """Raised by a step to fail at once, without further retries."""

    retryable = False


class RetryLater(EssentialError):
    """Raised by a step whose attempt had no effect and should run again later (a durable timer).

    The stage is recorded as deferred (nothing to compensate), the saga waits
    without holding an actor, and the step then runs again as a new stage with
    a new idempotency key; ``ctx.deferred`` counts the earlier deferrals, so
    the step decides when to give up.  ``RetryLater(hours=6, reason="card declined")``.
    """

    def __init__(
        self, seconds: float = 0.0, *, minutes: float = 0.0, hours: float = 0.0, days: float = 0.0, reason: str = ""
    ) -> None:
        self.delay = seconds + 60 * minutes + 3600 * hours + 86400 * days
        if self.delay <= 0:
            raise ValueError("RetryLater needs a positive delay")
        self.reason = reason
        super().__init__(reason or f"retry in {self.delay:g}s")


class LockBusy(EssentialError):
    """A bucket lock a step needs is held by another live saga."""

    def __init__(self, bucket: str, key: str, holder: str | None, holder_job: str | None = None,
                 holder_state: str | None = None) -> None:  # fmt: skip
        self.bucket, self.key, self.holder = bucket, key, holder
        self.holder_job, self.holder_state = holder_job, holder_state
        who = f"saga {holder}" if holder else "another saga"
        if holder_job:
            who += f" ({holder_job}, {holder_state or 'live'})"
        super().__init__(f"{key!r} in {bucket} is locked by {who} until that saga ends")


class InvalidField(InvalidRequest):
    """A request field that cannot be accepted; ``fields`` lists ``(field, reason)``."""

    def __init__(self, field_name: str, reason: str, *, more: Sequence[tuple[str, str]] = ()) -> None:
        self.fields = [(field_name, reason), *more]
        super().__init__("; ".join(f"{f}: {r}" for f, r in self.fields))


class TooManyOpenSagas(EssentialError):
    """No room for another live saga (ESSENTIAL_MAX_LIVE_SAGAS): retry later, or place recorded sagas shared."""


class SagaIdReused(IdempotencyKeyReused):
    """A start repeated with a saga id (the service's own idempotency key) and different parameters."""

    def __init__(self, saga_id: str, differs: Sequence[str]) -> None:
        self.key = self.saga_id = saga_id
        reason = f"already taken by a saga started with a different {', '.join(differs)}"
        self.fields = [("id", reason)]
        Exception.__init__(
            self, f"saga id {saga_id} is {reason}; repeat the original request to get that saga, or choose a new id"
        )


class CorruptDocument(EssentialError):
    """A stored document Essential cannot read: not the caller's doing, and never silently dropped."""

    def __init__(self, what: str, reason: str) -> None:
        self.what, self.reason = what, reason
        super().__init__(
            f"{what}: its stored document cannot be read ({reason}); Essential leaves it as it is - "
            "an operator must repair or remove it"
        )


class StoreUnavailable(EssentialError):
    """MongoDB did not answer within the outage budget: Essential really cannot answer now."""


def field_problems(exc: Any, root: str = "<request>", limit: int | None = None) -> list[tuple[str, str]]:
    """A pydantic ``ValidationError`` as ``(field, reason)`` pairs; a problem of the whole value names ``root``.

    Every boundary (start and signal requests, payloads, Kafka commands, HTTP bodies)
    reports bad input the same way: the dotted path of each bad field and why.
    """
    return [(".".join(str(p) for p in err["loc"]) or root, err["msg"]) for err in exc.errors()[:limit]]


def invalid(what: str, exc: Any) -> InvalidRequest:
    """A pydantic ``ValidationError`` of a request as the :class:`InvalidRequest` that names each bad field."""
    return InvalidRequest(f"invalid {what}: " + "; ".join(f"{field}: {reason}" for field, reason in field_problems(exc)))


def rebuild_error(type_name: str, message: str) -> EssentialError:
    """Recreate a typed error sent across a process boundary (Ray, Kafka, HTTP) by name."""
    cls: type[EssentialError] = _BY_NAME.get(type_name, EssentialError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


_BY_NAME: dict[str, type[EssentialError]] = {
    c.__name__: c
    for c in (
        EssentialError, InvalidRequest, UnknownJob, JobVersionMissing, JobModuleMissing, InvalidPayload,
        IdempotencyKeyReused,
        SagaNotFound, IllegalTransition, LeaseLost, StepTimeout, StepFailed, LockBusy,
    )
}


class DeadLetterRefused(EssentialError):
    """Kafka refused even the stripped dead letter of a message: the gateway logs where it is and moves on."""

    def __init__(self, topic: str, source: str, reason: str) -> None:
        self.topic, self.source = topic, source
        super().__init__(
            f"Kafka refused the dead letter of {source} on {topic}: {reason}; create that topic, let the gateway "
            "write to it and allow messages of a few KiB at least (max.message.bytes)"
        )


class CommandNotQueued(EssentialError):
    """A participant command could not be numbered: concurrent writers of the same saga kept colliding."""

    def __init__(self, command_id: str, attempts: int) -> None:
        self.command_id = command_id
        super().__init__(
            f"could not queue participant command {command_id}: {attempts} attempts collided with concurrent "
            "writers of the same saga; the step is retried"
        )


_BY_NAME.update({
    c.__name__: c
    for c in (DeadLetterRefused, CommandNotQueued, InvalidField, TooManyOpenSagas, SagaIdReused, CorruptDocument,
              StoreUnavailable)
})  # fmt: skip


# -- the error contract: how a typed error crosses Ray, Kafka and HTTP ---------------------------
def envelope(exc: EssentialError) -> dict[str, Any]:
    """The reply that carries ``exc``: ``{"error": {"type", "message", "fields"?}}``.

    Every side of Essential answers an error this way (the supervisor, a saga's
    actor, the recorded-saga service), and every caller reads it back with
    :func:`raise_for_error`, so a client sees the same typed error whichever
    process refused it.
    """
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    fields = getattr(exc, "fields", None)  # InvalidField, and the reused id/key errors
    if fields:
        error["fields"] = [{"field": f, "reason": r} for f, r in fields]
    return {"error": error}


def raise_for_error(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or the typed error it carries raised as what it was (with its ``fields``)."""
    if "error" not in reply:
        return reply
    error = reply["error"]
    fields = [(f["field"], f["reason"]) for f in error.get("fields") or []]
    if error["type"] == InvalidField.__name__ and fields:
        first, *rest = fields
        raise InvalidField(first[0], first[1], more=rest)
    exc = rebuild_error(error["type"], error["message"])
    if fields:
        exc.fields = fields  # type: ignore[attr-defined]
    raise exc
