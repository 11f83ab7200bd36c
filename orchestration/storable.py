"""Values MongoDB can store, checked at the boundary before anything is accepted.

Why here, in pure Python: a value the database refuses (an integer past 64
bits, a NUL byte or a leading ``$`` in a key, nesting past MongoDB's 100 levels)
would otherwise be accepted by a client, Kafka or HTTP, and fail only when the
store writes it — as a server error, a retried message, or a saga that cannot
checkpoint. Every boundary runs :func:`problems` on what it is given and refuses
the request with the path of each bad value. The walk is iterative, so a
hostile 10 000-level document cannot exhaust the interpreter's stack.
"""
from __future__ import annotations

import math
from typing import Any

#: nesting of objects and arrays a value may have (MongoDB allows 100 levels per document, and the
#: value sits inside the saga or stage document)
MAX_DEPTH = 64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: problems reported at most (a hostile value may have millions)
MAX_REPORTED = 5


def problems(value: Any, where: str = "payload", *, operators: bool = False) -> list[str]:
    """Why ``value`` cannot be stored as given: ``["payload.items.3.qty: integer 2**70 exceeds 64 bits"]``.

    ``operators``: keys may start with ``$`` (a recorded MongoDB call's own filter or update,
    stored as data); never for payloads, which could otherwise smuggle operators into queries.
    """
    found: list[str] = []
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack and len(found) < MAX_REPORTED:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_DEPTH:
                found.append(f"{_cut(path)}: nested deeper than {MAX_DEPTH} levels")
                continue
            for key, child in item.items():
                if not isinstance(key, str):
                    found.append(f"{path}: key {key!r} is not a string")
                    continue
                if not _encodable(key):
                    found.append(f"{path}: key {key!r} is not valid Unicode (a lone surrogate)")
                elif "\x00" in key:
                    found.append(f"{path}: key {key!r} contains a NUL character")
                elif key.startswith("$") and not operators:
                    found.append(f"{path}: key {key!r} starts with '$' (reserved for MongoDB operators)")
                stack.append((child, f"{path}.{key}", depth + 1))
        elif isinstance(item, (list, tuple)):
            if depth >= MAX_DEPTH:
                found.append(f"{_cut(path)}: nested deeper than {MAX_DEPTH} levels")
                continue
            stack.extend((child, f"{path}.{i}", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            if not _encodable(item):
                found.append(f"{path}: text is not valid Unicode (a lone surrogate)")
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                found.append(f"{path}: integer {_short(item)} does not fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                found.append(f"{path}: {item} is not a finite number")
    return found


def depth_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``value`` nests deeper than ``limit`` (iterative: safe on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _encodable(text: str) -> bool:
    """Can it be stored as UTF-8 (BSON's encoding)? JSON's ``\ud800`` escapes decode to lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cut(path: str, keep: int = 60) -> str:
    return path if len(path) <= keep else f"{path[:keep]}…"


def _short(number: int) -> str:
    text = str(number)
    return text if len(text) <= 24 else f"{text[:10]}…({len(text)} digits)"
