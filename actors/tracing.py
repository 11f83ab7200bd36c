"""W3C trace context for sagas: one trace per saga, from the start request to the participants.

The start request's ``traceparent`` is stored on the saga and travels from
there in every stage's meta, every outbox event's Kafka headers and every
command a Kafka step sends to a participant (each command as its own child
span of the saga's trace).  A request without one gets one here:

* from the caller's current OpenTelemetry span when ``opentelemetry-api`` is
  installed and a span is active (the saga joins the caller's trace);
* otherwise a new random trace (formatted by OpenTelemetry's W3C propagator
  when it is installed, by hand otherwise - same header either way).
"""
from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

try:  # optional: the API alone is enough (no SDK, no exporter)
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator as _Propagator

    OTEL = True
except ImportError:  # pragma: no cover - depends on the environment
    OTEL = False


def valid(traceparent: Any) -> bool:
    """A well-formed version-00 style header with non-zero ids."""
    if not isinstance(traceparent, str):
        return False
    match = TRACEPARENT.match(traceparent.strip())
    return bool(match) and match.group(1) != "ff" and match.group(2) != _ZERO_TRACE and match.group(3) != _ZERO_SPAN


def trace_id(traceparent: str | None) -> str | None:
    if not valid(traceparent):
        return None
    return traceparent.strip().split("-")[1]  # type: ignore[union-attr]


def current_traceparent() -> str | None:
    """The caller's active OpenTelemetry span as a header, if there is one."""
    if not OTEL:
        return None
    span_context = _otel_trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    carrier: dict[str, str] = {}
    _Propagator().inject(carrier)
    value = carrier.get("traceparent")
    return value if valid(value) else None


def _format(trace: str, span: str, flags: str = "01") -> str:
    if OTEL:
        context = _otel_trace.SpanContext(
            trace_id=int(trace, 16), span_id=int(span, 16), is_remote=False,
            trace_flags=_otel_trace.TraceFlags(int(flags, 16)),
        )  # fmt: skip
        carrier: dict[str, str] = {}
        _Propagator().inject(carrier, context=_otel_trace.set_span_in_context(_otel_trace.NonRecordingSpan(context)))
        if "traceparent" in carrier:
            return carrier["traceparent"]
    return f"00-{trace}-{span}-{flags}"


def new_traceparent() -> str:
    """A new trace (sampled) with a random root span."""
    trace, span = secrets.token_hex(16), secrets.token_hex(8)
    while trace == _ZERO_TRACE or span == _ZERO_SPAN:  # pragma: no cover - 2**-64
        trace, span = secrets.token_hex(16), secrets.token_hex(8)
    return _format(trace, span)


def child(traceparent: str | None, seed: str | None = None) -> str | None:
    """A child span of ``traceparent``: same trace, new span id (stable for a given ``seed``)."""
    if not valid(traceparent):
        return traceparent or None
    _, trace, _, flags = traceparent.strip().split("-")  # type: ignore[union-attr]
    span = hashlib.sha256(f"{trace}:{seed}".encode()).hexdigest()[:16] if seed else secrets.token_hex(8)
    if span == _ZERO_SPAN:  # pragma: no cover
        span = "0" * 15 + "1"
    return _format(trace, span, flags)


def ensure_traceparent(request: Any) -> Any:
    """A start request (dict) with a valid ``traceparent``: the caller's, the active span's, or a new one.

    An invalid header starts a new trace, as the W3C specification asks.
    Anything that is not a dict is returned unchanged (validation reports it).
    """
    if not isinstance(request, dict) or valid(request.get("traceparent")):
        return request
    return {**request, "traceparent": current_traceparent() or new_traceparent()}
