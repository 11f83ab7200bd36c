"""Validation at the boundary: what MongoDB could not store, or a caller did not mean, is refused with its path."""
from __future__ import annotations

from typing import Any

import pytest

from essential.orchestration import IdempotencyKeyReused, InvalidRequest, storable
from essential.orchestration.requests import MAX_TTL_SECONDS, StartRequest
from essential.orchestration.signals import SignalRequest

from .test_saga_runtime import call


def _deep(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"n": 2**70}, "does not fit in 64 bits"),
        ({"items": [{"qty": -(2**63) - 1}]}, "payload.items.0.qty"),
        ({"bad\x00key": 1}, "NUL"),
        ({"$where": "sleep(1000)"}, "starts with '$'"),
        ({"x": {"$gt": ""}}, "payload.x"),
        (_deep(10_000), "nested deeper than 64 levels"),
        ({"f": float("nan")}, "not a finite number"),
        ({"name": "x\ud800y"}, "lone surrogate"),
        ({"\udfff": 1}, "lone surrogate"),
    ],
)
def test_unstorable_payloads_are_refused_with_their_path(payload: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        StartRequest.parse({"job": "test:chain", "payload": payload})
    assert says in str(refused.value)
    with pytest.raises(InvalidRequest):
        SignalRequest.parse({"saga": "0" * 24, "name": "x", "payload": payload})


def test_storable_values_pass() -> None:
    fine = {"a": [1, 2.5, "x\x00y", None, True, {"b": 2**63 - 1}], "c": _deep(60)}
    assert storable.problems(fine) == []
    StartRequest.parse({"job": "test:chain", "payload": fine})


@pytest.mark.parametrize("ttl", [True, False, "10", 0, -1, float("inf"), float("nan"), 1e12, MAX_TTL_SECONDS + 1])
def test_a_ttl_must_be_a_finite_positive_number_within_ten_years(ttl: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        StartRequest.parse({"job": "test:chain", "ttl": ttl})
    assert "ttl" in str(refused.value)


def test_strict_types_where_a_wrong_type_is_a_mistake() -> None:
    assert StartRequest.parse({"job": "test:chain", "ttl": 5}).ttl == 5.0
    for bad in ({"job": 5}, {"job": "x", "payload": "{}"}, {"job": "x", "idempotency_key": 7}):
        with pytest.raises(InvalidRequest):
            StartRequest.parse(bad)


async def test_a_reused_idempotency_key_with_other_parameters_is_refused(client: Any) -> None:
    """Stripe-style: the same key with a different payload is the caller's mistake, not a repeat."""
    first = await call(client.start, "test:chain", {}, idempotency_key="reuse-check-1")
    again = await call(client.start, "test:chain", {}, idempotency_key="reuse-check-1")
    assert again == first, "a true repeat returns the same saga"
    with pytest.raises(IdempotencyKeyReused) as refused:
        await call(client.start, "test:chain", {"fail_at": "c"}, idempotency_key="reuse-check-1")
    assert first in str(refused.value) and "reuse-check-1" in str(refused.value)
    with pytest.raises(IdempotencyKeyReused):
        await call(client.start, "test:chain", {}, ttl=999, idempotency_key="reuse-check-1")
    await call(client.wait, first, 60)
