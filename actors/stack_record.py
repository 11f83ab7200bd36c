"""Where `essential up` recorded the local stack, read without importing Ray or PyMongo.

Why a module of its own: a Ray driver must have the stack's Ray settings
(token authentication on, every process on 127.0.0.1) in its environment
*before* Ray is imported and initialised, or it is refused by the head. The CLI
and the client therefore read the record first and apply it, then import Ray.
The launcher (``essential.actors.dev.stack``) writes the same file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RECORD = "stack.json"
#: the recorded component whose address each variable names
ADDRESS_VARIABLES = {
    "mongodb": "ESSENTIAL_MONGODB_URI",
    "kafka": "ESSENTIAL_KAFKA_BOOTSTRAP",
    "ray": "ESSENTIAL_RAY_ADDRESS",
}
#: what every Ray driver of the local stack needs before ``import ray``
RAY_DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


class CorruptStackRecord(RuntimeError):
    """The record exists but cannot be read; the message names the file."""


def home_of(home: str | os.PathLike[str] | None = None) -> Path:
    """The stack's home: ``home``, else ``ESSENTIAL_HOME``, else ``.essential`` (relative to the shell's directory)."""
    chosen = home if home is not None else os.environ.get("ESSENTIAL_HOME", ".essential")
    return Path(chosen).expanduser().resolve()


def read_record(home: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The recorded ``stack.json`` under ``home``, or None when no stack was started there."""
    return read_json(home_of(home) / RECORD)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file the stack wrote, or None when it is not there; a corrupt one says so."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise CorruptStackRecord(f"{path} is corrupt ({exc}); remove it after checking no stack processes run") from exc


def env_of(record: dict[str, Any]) -> dict[str, str]:
    """The environment a client of the recorded stack needs (addresses, and Ray's driver switches)."""
    env = {var: record[name]["address"] for name, var in ADDRESS_VARIABLES.items() if name in record}
    if "ray" in record:
        env.update(RAY_DRIVER_ENV)
        env["RAY_AUTH_MODE"] = record["ray"].get("auth_mode", "token")
    return env


def stack_env(home: str | os.PathLike[str] | None = None) -> dict[str, str] | None:
    """:func:`env_of` the record under ``home`` when every component is recorded; else None."""
    record = read_record(home)
    if not record or not all(name in record for name in ADDRESS_VARIABLES):
        return None
    return env_of(record)


def apply_stack_env(home: str | os.PathLike[str] | None = None) -> bool:
    """Point this process at the recorded stack; a variable the environment already sets wins.

    Returns whether a stack was recorded. Call it before Ray is imported.
    """
    env = stack_env(home)
    if env is None:
        return False
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return True


def ray_token_source() -> str:
    """Where this machine's Ray token is, in words (never the token itself): what the dashboard asks for."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the value of RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return f"the contents of {path}"
