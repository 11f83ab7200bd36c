"""Which failures of handling a Kafka message are worth retrying, and how to name one in a dead letter.

Why one place decides: a failure that can never succeed (a value MongoDB
cannot store, a bug, a payload the database refuses) must be dead-lettered at
once, while an outage (MongoDB, Ray or Kafka briefly away) deserves bounded
retries.  An error raised inside a Ray actor arrives wrapped in
``RayTaskError``; its cause decides, so an ``OverflowError`` from the
supervisor's store is never taken for a Ray outage.
"""
from __future__ import annotations

from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    KafkaUnavailableError,
)
from bson.errors import BSONError
from pymongo.errors import (
    ConnectionFailure,
    DocumentTooLarge,
    ExecutionTimeout,
    PyMongoError,
    WaitQueueTimeoutError,
    WTimeoutError,
)
from ray.exceptions import RayError, RayTaskError

from essential.actors.kafka.commands import GATEWAY_ERROR, NOT_STORABLE, TOO_DEEP

#: labels MongoDB puts on errors that a retry can cure
_RETRY_LABELS = ("TransientTransactionError", "RetryableWriteError", "RetryableError", "NoWritesPerformed")
_MAX_TEXT = 500


def cause_of(exc: BaseException) -> BaseException:
    """The error a remote actor raised, unwrapped from Ray's task error (nested calls included)."""
    seen = 0
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None and seen < 10:
        exc, seen = exc.cause, seen + 1  # type: ignore[assignment]
    return exc


def is_transient(exc: BaseException) -> bool:
    """True when the same message may succeed later without anyone changing it."""
    exc = cause_of(exc)
    if isinstance(exc, PyMongoError):
        if isinstance(exc, (ConnectionFailure, ExecutionTimeout, WTimeoutError, WaitQueueTimeoutError)):
            return True
        return any(exc.has_error_label(label) for label in _RETRY_LABELS)
    if isinstance(exc, KafkaError):
        return bool(exc.retriable) or isinstance(exc, (KafkaTimeoutError, KafkaConnectionError, KafkaUnavailableError))
    if isinstance(exc, RayError):  # an actor died or is restarting, a node went away: not the message's fault
        return not isinstance(exc, RayTaskError)
    return isinstance(exc, (TimeoutError, ConnectionError))


def permanent_code(exc: BaseException) -> str:
    """The dead-letter code of a failure that retrying cannot cure."""
    exc = cause_of(exc)
    if isinstance(exc, RecursionError):
        return TOO_DEEP
    if isinstance(exc, (OverflowError, BSONError, DocumentTooLarge, UnicodeEncodeError)):
        return NOT_STORABLE
    return GATEWAY_ERROR


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` of the underlying error, short enough for a header."""
    exc = cause_of(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
