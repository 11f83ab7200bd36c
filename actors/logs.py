"""Structured log lines: every line a saga process writes names the saga, job, stage, correlation and trace.

The fields come from a context variable bound per saga (each saga is driven in
its own asyncio task, so sagas sharing a host process never mix), plus any
``extra=`` given to one call.  Two formats (``ESSENTIAL_LOG_FORMAT``):

* ``kv`` (default): ``2026-05-14T09:12:03.123Z INFO essential.saga stage finished saga=665… job=order:fulfillment stage=charge_wallet seq=2 …``
* ``json``: one JSON object per line, for log shippers.

Lines go to stderr, which Ray keeps per worker: the dashboard's actor page
("Log") shows them next to the ``saga:<id>`` actor.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from essential.actors.tracing import trace_id
from essential.orchestration import Saga, SagaState, Stage

#: the context fields, in the order they are printed
FIELDS = ("saga", "job", "stage", "seq", "action", "status", "state", "correlation_id", "trace_id", "where")
_EXTRA = ("duration_ms", "retries", "compensates", "error", "event")

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("essential_log_context", default={})
_configured: dict[str, Any] = {}

saga_log = logging.getLogger("essential.saga")


def bind(**fields: Any) -> contextvars.Token:
    """Add fields to the current task's log context (returns the token to reset it)."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    return _context.set(merged)


def bind_saga(saga: Saga) -> None:
    bind(saga=saga.id, job=saga.job, correlation_id=saga.correlation_id, trace_id=trace_id(saga.traceparent))


def context() -> dict[str, Any]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (a field given with ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in (*FIELDS, *_EXTRA) if getattr(record, k, None) not in (None, "")}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, record.getMessage()]
        for key, value in _fields(record).items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if (' ' in text or '=' in text or not text) else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name,
                                "msg": record.getMessage(), **_fields(record)}  # fmt: skip
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def formatter(fmt: str = "kv") -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else KeyValueFormatter()


def configure(fmt: str = "kv", level: str | int = "INFO", stream: Any = None) -> None:
    """Structured lines for every ``essential.*`` logger of this process (idempotent; re-configurable)."""
    root = logging.getLogger("essential")
    handler = _configured.get("handler")
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
        root.propagate = False
        _configured["handler"] = handler
    elif stream is not None:
        handler.setStream(stream)
    handler.setFormatter(formatter(fmt))
    root.setLevel(level)


# -- what saga processes log about each checkpoint ----------------------------------------------
def saga_event(kind: str, saga: Saga, what: Stage | SagaState) -> None:
    """Runner observer hook: one line per finished stage and per state change."""
    bind_saga(saga)
    if kind == "stage" and isinstance(what, Stage):
        stage = what
        bind(stage=stage.step)
        level = logging.WARNING if stage.status.value == "failed" else logging.INFO
        saga_log.log(
            level,
            "stage %s %s", stage.step, stage.status.value,
            extra={"seq": stage.seq, "action": stage.action.value, "status": stage.status.value,
                   "duration_ms": stage.meta.duration_ms, "retries": stage.meta.retry_count or None,
                   "compensates": stage.compensates,
                   "error": stage.meta.errors[-1] if stage.meta.errors and stage.status.value == "failed" else None},
        )  # fmt: skip
    elif isinstance(what, SagaState):
        _context.set({k: v for k, v in _context.get().items() if k != "stage"})
        level = logging.WARNING if what == SagaState.PARKED else logging.INFO
        saga_log.log(level, "saga %s", what.value, extra={"state": what.value, "error": saga.error or saga.parked_reason})
