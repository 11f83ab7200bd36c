"""Signals: named events delivered to a saga from outside (an approval, a payment provider's callback).

Every entry point (Python client, Kafka ``{"type": "signal"}`` command, HTTP)
validates with :class:`SignalRequest`, then the store keeps the signal durably
*before* anything else happens, whether or not an actor runs the saga, and
wakes the saga if it waits for that name.  A ``wait_for`` step consumes the
oldest signal of its name that no earlier wait consumed; a signal that comes
before the saga reaches its wait is kept until it does.  A repeated delivery
with the same ``key`` is stored once.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from essential.orchestration import storable
from essential.orchestration.validated import Validated

#: a signal's payload is JSON of at most this many bytes
MAX_SIGNAL_BYTES = 256 * 1024


class SignalRequest(Validated):
    WHAT = "signal"
    model_config = ConfigDict(extra="forbid")

    saga: str = Field(pattern=r"^[0-9a-f]{24}$", description="the saga's id (24 hex digits)")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$")
    payload: Any = None
    key: str | None = Field(default=None, min_length=1, max_length=200, description="deduplicates redeliveries")

    @field_validator("payload")
    @classmethod
    def _json_and_small(cls, value: Any) -> Any:
        found = storable.problems(value)  # first: it is safe on any depth, json.dumps is not
        if found:
            raise ValueError("; ".join(found))
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON: {exc}") from None
        if size > MAX_SIGNAL_BYTES:
            raise ValueError(f"{size} bytes of JSON exceed the limit of {MAX_SIGNAL_BYTES}")
        return value

