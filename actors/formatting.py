"""Numbers as people read them, shared by the CLI's views and the demo's summary."""
from __future__ import annotations


def human_ms(value: float | None) -> str:
    """Milliseconds, readable: ``65.2 ms``, ``7.32 s``, ``3.5 min``."""
    if value is None:
        return ""
    if value < 1000:
        return f"{value:.1f} ms"
    if value < 60_000:
        return f"{value / 1000:.2f} s"
    return f"{value / 60_000:,.1f} min"
