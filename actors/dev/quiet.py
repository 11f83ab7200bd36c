"""Keep Ray's own chatter out of a terminal session, in a log file instead.

A CLI command or the demo is a Ray driver, and Ray writes to a driver's
terminal on its own: INFO lines of its ``ray`` logger on every connection, and
the raylet's warnings (such as "N PYTHON worker processes have been started")
printed to *stdout* by a background thread, where they break ``--json``
output. Nothing is dropped: both go to the log file, and ``--verbose`` leaves
Ray as it is.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

_done = threading.Event()
_handler: logging.Handler | None = None


def quiet_ray(log_path: Path | None = None) -> Path | None:
    """Send Ray's driver-side logging and raylet messages to ``log_path`` (default ``<home>/logs/cli.log``).

    Idempotent; returns the log file. Call it before ``ray.init`` (it imports Ray).
    """
    from essential.actors.stack_record import home_of

    path = log_path or home_of() / "logs" / "cli.log"
    if _done.is_set():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    import ray  # noqa: F401 - importing it installs Ray's own handler, which this replaces
    import ray._private.worker as ray_worker

    global _handler
    _handler = handler
    quiet_logger("ray")
    raylet = logging.getLogger("essential.raylet")
    raylet.propagate = False
    raylet.addHandler(handler)

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            raylet.warning("(%s) %s", data.get("pid", "raylet"), line)

    # the raylet's messages reach a driver through this module-level function only
    if hasattr(ray_worker, "print_to_stdstream"):
        ray_worker.print_to_stdstream = to_log
    _done.set()
    return path


def quiet_logger(name: str) -> None:
    """After :func:`quiet_ray`: send a Ray library's own logger (``ray.serve`` sets up its own) to the log file."""
    if _handler is None:
        return
    logger = logging.getLogger(name)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(_handler)
