"""The ``essential`` command line.

Bad input never shows a traceback: typed errors are printed as one line that
says what to fix, with exit code 2.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from essential.actors.dev.quiet import quiet_logger, quiet_ray
from essential.actors.formatting import human_ms
from essential.actors.settings import Settings, get_settings
from essential.actors.stack_record import CorruptStackRecord, apply_stack_env, home_of, ray_token_source, read_record
from essential.orchestration import EssentialError, InvalidRequest, Saga
from essential.orchestration.states import ENDED_STATES

# soft wrap: a line longer than the terminal (an address, an export line) stays one line to copy
# a pipe gets wide tables (no column cut to 80 characters); a terminal, its own width
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)

STATE_STYLE = {
    "pending": "cyan", "running": "blue", "waiting": "magenta", "compensating": "yellow", "committing": "blue",
    "completed": "green", "aborted": "red", "parked": "bold magenta",
}  # fmt: skip
ENDED = sorted(s.value for s in ENDED_STATES)


class NoDeployment(EssentialError):
    """No deployment is named and no local stack is recorded: the command has nothing to talk to."""


def _deployment(server: str) -> Settings:
    """Settings naming the deployment a command talks to: the environment's, else the recorded local stack's.

    ``server`` is the variable that names it (``ESSENTIAL_RAY_ADDRESS`` for
    commands that go through the supervisor, ``ESSENTIAL_MONGODB_URI`` for the
    read-only views). Never a silent default: with neither the variable nor a
    recorded stack, whatever listens on a default port could be another
    deployment, so the command says so instead. The record is applied before
    Ray is imported (Ray reads its token-authentication mode at import).
    """
    if not os.environ.get(server):
        if not apply_stack_env():
            raise NoDeployment(
                f"no local stack is recorded in {home_of() / 'stack.json'} and {server} is not set: "
                f"run `essential up` in this directory first, or set {server} to your deployment"
            )
        get_settings.cache_clear()
    return get_settings()


VERBOSE = False  # --verbose: Ray's own lines stay in the terminal


def _client() -> Any:
    """A client of ESSENTIAL_RAY_ADDRESS, or else of the stack `essential up` recorded."""
    settings = _deployment("ESSENTIAL_RAY_ADDRESS")
    if not VERBOSE:
        quiet_ray()
    from essential.actors.client.ray_client import EssentialClient

    return EssentialClient(settings, address=settings.ray_address)


def _read(view: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run a read-only view against MongoDB directly (works while Ray is down or busy)."""
    settings = _deployment("ESSENTIAL_MONGODB_URI")
    from pymongo import AsyncMongoClient
    from pymongo.errors import ServerSelectionTimeoutError

    from essential.persistence.connection import new_client
    from essential.persistence.views import SagaViews

    async def run() -> Any:
        client: AsyncMongoClient = new_client(settings.mongodb_uri, serverSelectionTimeoutMS=5000)
        try:
            return await view(SagaViews(client[settings.database]))
        except ServerSelectionTimeoutError:
            raise EssentialError(
                f"cannot reach MongoDB at {settings.mongodb_uri}: start the stack with `essential up` "
                f"or set ESSENTIAL_MONGODB_URI"
            ) from None
        finally:
            await client.close()

    return asyncio.run(run())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$")
_UNIT = {None: 60, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """``30s``, ``10m``, ``2h``, ``1d`` (ago; a bare number is minutes) or an ISO 8601 time."""
    if not value:
        return None
    now = now or datetime.now(timezone.utc)
    match = _DURATION.match(value)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNIT[match.group(2)])
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"--since {value!r}: use a duration such as 30s, 10m, 2h, 1d, or an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _local(value: datetime | str | None, fmt: str = "%H:%M:%S") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone().strftime(fmt)


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def _saga_table(sagas: list[Saga]) -> Table:
    """Ids whole (they are copied into the next command); the other columns give way on a narrow terminal."""
    table = Table(title=f"{len(sagas)} saga(s)", title_justify="left", box=None, padding=(0, 2, 0, 0))
    table.add_column("id", no_wrap=True, min_width=24)
    table.add_column("job", no_wrap=True, overflow="ellipsis")
    table.add_column("state", no_wrap=True, min_width=9)
    table.add_column("created", no_wrap=True)
    table.add_column("updated", no_wrap=True, overflow="ellipsis", max_width=8)
    table.add_column("where / why", overflow="fold", ratio=1)
    for s in sagas:
        why = (s.parked_reason if s.state.value == "parked" else None) or s.error or s.parked_reason
        why = why or getattr(s, "waiting_for", None) or ""
        if not why and s.state.value in ("running", "compensating", "committing"):
            why = s.lease.owner or ""
        table.add_row(
            s.id, s.job, _state(s.state.value), _local(s.createdAt, "%m-%d %H:%M:%S"), _local(s.updatedAt),
            why[:200],
        )  # fmt: skip
    return table


def _print(data: Any, as_json: bool, render: Callable[[], Any]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        console.print(render())


# -- commands -------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from essential.actors.dev.stack import DEMO_JOB_MODULES, LocalStack

    os.environ.setdefault("ESSENTIAL_JOB_MODULES", DEMO_JOB_MODULES)  # the dev stack serves the example jobs
    get_settings.cache_clear()
    settings = get_settings()
    stack = LocalStack(settings)
    was_running = stack.state() is not None
    if not was_running:
        _check_http_port(settings)
    with console.status("starting embedded MongoDB, Kafka and a local Ray head…"):
        info = stack.up()
    try:
        os.environ.update(stack.env())  # the stack's servers, and Ray's driver switches before Ray is imported
        get_settings.cache_clear()
        with console.status("starting the supervisor, the Kafka gateway and the HTTP API…"):
            _client()  # creates the supervisor so it starts sweeping at once
            _start_gateway()
            http = _start_http()
            if http:
                stack.note("http", {"address": http})
            seeded = _seed_examples(args.seed)
    except BaseException:
        if not was_running:  # leave nothing behind that this command started
            err_console.print("[red]the stack did not come up; stopping what this command started[/]")
            _leave_ray()  # a driver whose cluster vanishes under it is ended by Ray itself
            stack.down()
        raise
    home = stack.home
    console.print("[bold green]Essential is up[/]")
    console.print(f"  MongoDB:       {info['mongodb']['address']}")
    console.print(f"  Kafka:         {info['kafka']['address']}")
    console.print(f"  Ray:           {info['ray']['address']}")
    console.print(f"  Ray dashboard: {info['ray']['dashboard_url']}  (it asks for Ray's token: {ray_token_source()})")
    if http:
        where = "ESSENTIAL_HTTP_TOKEN" if get_settings().http_token else _shown(home / "http_token")
        console.print(f"  HTTP API:      {http}  (bearer token in {where}; `essential token` prints it)")
    else:
        console.print("  HTTP API:      not started (Ray Serve is not installed)")
    if seeded is not None:
        console.print(f"  example data:  {seeded}")
    console.print(f"  logs:          {_shown(stack.log_dir)}")
    console.print(f"Commands run in this directory ({Path.cwd()}) find the stack by themselves. Elsewhere, export:")
    for key, value in {"ESSENTIAL_HOME": str(home), **stack.env()}.items():
        console.print(f"  export {key}={shlex.quote(value)}", highlight=False)
    console.print("Stop it with: [bold]essential down[/]")
    return 0


def _check_http_port(settings: Settings) -> None:
    """Before anything starts: the HTTP API's port must be free (the other servers' launchers check theirs)."""
    from essential.actors.dev.mongodb import port_in_use
    from essential.actors.dev.stack import StackError

    if port_in_use(settings.http_port, settings.http_host):
        raise StackError(
            f"the HTTP API's port {settings.http_host}:{settings.http_port} is already in use; "
            f"set ESSENTIAL_HTTP_PORT to a free port"
        )


def _leave_ray() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def _shown(path: Path) -> str:
    """A path as a user would type it here: relative to the current directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _start_http() -> str | None:
    """The HTTP API (Ray Serve bound to ESSENTIAL_HTTP_HOST); its base address, or None without Ray Serve."""
    try:
        from essential.actors.http.api import ensure_token, start_http
    except ImportError:  # Ray Serve not installed
        return None
    from essential.actors.dev.stack import StackError

    quiet_logger("ray.serve")  # Ray Serve installs its own terminal handler when imported
    settings = get_settings()
    where = f"{settings.http_host}:{settings.http_port}"
    try:
        return start_http(settings, token=ensure_token(settings))
    except Exception as exc:  # noqa: BLE001 - said once, with what to change
        reason = (str(exc).strip().splitlines() or [""])[-1]
        raise StackError(
            f"the HTTP API did not start on {where} ({type(exc).__name__}: {reason}); "
            f"set ESSENTIAL_HTTP_PORT to a free port"
        ) from exc


def _start_gateway() -> None:
    try:
        from essential.actors.kafka.gateway import ensure_gateway
    except ImportError:  # the Kafka gateway is optional on a cluster without Kafka
        return
    ensure_gateway(get_settings())


def _seed_examples(wanted: bool) -> str | None:
    """Create the example services' data once (what the README's first examples use); what to print about it."""
    if not wanted or "examples.jobs" not in get_settings().job_modules:
        return None
    from essential.actors.dev.stack import examples_importable
    from essential.persistence.connection import close_shared_clients

    examples_importable()
    from examples.data import seed_demo_once

    async def seed() -> bool:
        try:
            return await seed_demo_once()
        finally:
            await close_shared_clients()

    if asyncio.run(seed()):
        return "seeded (wallets cust-000…cust-049, carol; sku-000…sku-019; routes north/south/east/west)"
    return "already there (kept as the sagas left it)"


def cmd_down(args: argparse.Namespace) -> int:
    from essential.actors.dev.stack import LocalStack

    stack = LocalStack(get_settings())
    stopped = stack.down()
    if not stopped:
        console.print(f"nothing was running (no stack recorded in {_shown(stack.state_path)})", soft_wrap=True)
    for line in stopped:
        console.print(line, soft_wrap=True)
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    """Print an address of the recorded stack, for scripts (``API=$(essential url)``)."""
    record = read_record()
    if record is None:
        raise NoDeployment(f"no local stack is recorded in {home_of() / 'stack.json'}: run `essential up` first")
    if args.what == "dashboard":
        address = record.get("ray", {}).get("dashboard_url")
    elif args.what == "metrics":
        address = record.get("ray", {}).get("metrics_url")
    else:
        address = record.get("http", {}).get("address")
    if not address:
        raise NoDeployment(f"the recorded stack has no {args.what} address (was it started by `essential up`?)")
    print(address)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print the HTTP API's bearer token (for scripts; `essential up` only says where it is)."""
    settings = get_settings()
    if settings.http_token:
        print(settings.http_token)
        return 0
    path = Path(settings.home) / "http_token"
    if not path.exists():
        raise NoDeployment(f"no HTTP token in {_shown(path)}: run `essential up` first, or set ESSENTIAL_HTTP_TOKEN")
    print(path.read_text().strip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from essential.actors.dev.demo import run_demo
    from essential.actors.dev.stack import DEMO_JOB_MODULES

    os.environ.setdefault("ESSENTIAL_JOB_MODULES", DEMO_JOB_MODULES)
    get_settings.cache_clear()

    return run_demo(per_job=args.per_job, keep=args.keep, verbose=VERBOSE)


#: exit codes of `start --wait`: every saga completed / some ended otherwise / bad input / still running at the timeout
EXIT_COMPLETED, EXIT_NOT_COMPLETED, EXIT_BAD_INPUT, EXIT_TIMED_OUT = 0, 1, 2, 3
BATCH_TOKEN = "{n}"


def cmd_start(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"--payload is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if args.count < 1:
        raise InvalidRequest("--count must be at least 1")
    if args.timeout <= 0:
        raise InvalidRequest("--timeout must be positive")
    client = _client()
    if args.count > 1:
        return _start_batch(client, args, payload)
    saga_id = client.start(
        args.job, payload, ttl=args.ttl, idempotency_key=args.key, correlation_id=args.correlation_id
    )
    if not args.wait:
        if args.quiet:
            print(saga_id)
        else:
            _print({"id": saga_id}, args.json, lambda: f"started saga [bold]{saga_id}[/]")
        return EXIT_COMPLETED
    try:
        saga = client.wait(saga_id, timeout=args.timeout)
    except TimeoutError:
        state = client.states([saga_id]).get(saga_id, "?")
        err_console.print(f"timed out after {args.timeout:g} s: saga {saga_id} is still {state}")
        return EXIT_TIMED_OUT
    if args.quiet:
        print(saga_id)
    else:
        _print(saga.model_dump(mode="json"), args.json, lambda: _saga_table([saga]))
    return EXIT_COMPLETED if saga.state.value == "completed" else EXIT_NOT_COMPLETED


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait for a saga started earlier; the exit code says how it ended (as ``start --wait``)."""
    if args.timeout <= 0:
        raise InvalidRequest("--timeout must be positive")
    client = _client()
    try:
        saga = client.wait(args.id, timeout=args.timeout)
    except TimeoutError:
        state = client.states([args.id]).get(args.id, "?")
        err_console.print(f"timed out after {args.timeout:g} s: saga {args.id} is still {state}")
        return EXIT_TIMED_OUT
    _print(saga.model_dump(mode="json"), args.json, lambda: _saga_table([saga]))
    return EXIT_COMPLETED if saga.state.value == "completed" else EXIT_NOT_COMPLETED


BATCH_CHUNK = 50


def _progress() -> Progress:
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())  # fmt: skip
    # progress goes to stderr: stdout stays clean for --json
    return Progress(*columns, console=err_console, transient=False)


_BATCH_FIELD = re.compile(r"\{n(?::([^{}]*))?\}")


def fill_template(value: Any, n: int) -> Any:
    """The batch's ``n``-th payload: ``{n}`` (or ``{n:03d}``, any format spec) in every string value becomes ``n``."""
    if isinstance(value, str):
        return _BATCH_FIELD.sub(lambda m: format(n, m.group(1) or ""), value)
    if isinstance(value, dict):
        return {key: fill_template(item, n) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_template(item, n) for item in value]
    return value


def _start_batch(client: Any, args: argparse.Namespace, payload: Any) -> int:
    """``start --count N``: start in chunks, then (with --wait) follow them to the end, with progress bars."""
    if fill_template(payload, 1) == fill_template(payload, 2):
        err_console.print(
            f"note: all {args.count} sagas get the same payload; put {BATCH_TOKEN} in its business ids "
            f'(e.g. "order_id": "o-{BATCH_TOKEN}", or {{n:03d}} for 001, 002 …) to make each one distinct'
        )
    requests = [
        {"job": args.job, "payload": fill_template(payload, n), "ttl": args.ttl, "correlation_id": args.correlation_id,
         "idempotency_key": f"{args.key}:{n}" if args.key else None}
        for n in range(1, args.count + 1)
    ]  # fmt: skip
    ids: list[str] = []
    states: dict[str, str] = {}
    done = 0
    with _progress() as progress:
        started = progress.add_task("started", total=len(requests), note="")
        for i in range(0, len(requests), BATCH_CHUNK):
            ids += client.start_many(requests[i : i + BATCH_CHUNK])
            progress.update(started, completed=len(ids))
        if args.wait:
            finished = progress.add_task("finished", total=len(ids), note="")
            deadline = time.monotonic() + args.timeout
            while True:
                states = client.states(ids)
                counts = Counter(states.values())
                done = sum(counts[s] for s in ENDED)
                note = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
                progress.update(finished, completed=done, note=note)
                if done == len(ids) or time.monotonic() >= deadline:
                    break
                time.sleep(0.3)
    if not args.wait:
        if args.quiet:
            print("\n".join(ids))
        else:
            _print({"ids": ids}, args.json, lambda: f"started {len(ids)} saga(s) of [bold]{args.job}[/]")
        return EXIT_COMPLETED
    counts = Counter(states.get(i, "?") for i in ids)
    timed_out = done < len(ids)
    data = {"ids": ids, "states": states, "counts": dict(counts), "timed_out": timed_out}

    def render() -> Table:
        table = Table("state", "sagas", title=f"{len(ids)} saga(s) of {args.job}")
        for state, n in sorted(counts.items()):
            table.add_row(_state(state), str(n))
        return table

    if args.quiet:
        print("\n".join(ids))
    else:
        _print(data, args.json, render)
    if timed_out:
        err_console.print(
            f"timed out after {args.timeout:g} s: {done} finished, {len(ids) - done} still running "
            f"(follow them with `essential list` or `essential stats`)"
        )
        return EXIT_TIMED_OUT
    return EXIT_COMPLETED if counts.get("completed", 0) == len(ids) else EXIT_NOT_COMPLETED


# -- read-only views ----------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    data = _read(lambda views: views.inspect(args.id))
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    console.print(render_inspect(data))
    return 0


def render_inspect(data: dict[str, Any]) -> Group:
    saga = data["saga"]
    state = saga["state"]
    head = Text.assemble(("saga ", "bold"), (saga["id"], "bold"), f" · {saga['job']} v{saga['version']} · ",
                         _state(state))  # fmt: skip
    lines: list[Any] = [head]
    ended = saga.get("committed_at") or saga.get("aborted_at")
    took = f" · took {human_ms(data.get('duration_ms'))}" if data.get("duration_ms") is not None else ""
    lines.append(Text(f"  created {_local(saga['createdAt'], '%Y-%m-%d %H:%M:%S')}"
                      + (f" · ended {_local(ended)}" if ended else f" · updated {_local(saga['updatedAt'])}")
                      + f"{took} · ttl {saga['ttl']:g}s"))  # fmt: skip
    live = state in ("pending", "running", "compensating", "committing", "waiting")
    where = data.get("where") or "(no actor yet)"
    lines.append(Text(f"  {'runs on' if live else 'ran on'}: {where} (lease epoch {data.get('epoch', 0)})"))
    if saga.get("correlation_id") or saga.get("traceparent"):
        lines.append(Text(f"  correlation: {saga.get('correlation_id') or '-'} · traceparent: {saga.get('traceparent') or '-'}"))
    for key, label, style in (("error", "error", "red"), ("abort_requested", "abort requested", "yellow"),
                              ("parked_reason", "parked", "magenta"), ("waiting_for", "waiting for", "magenta")):  # fmt: skip
        if saga.get(key):
            lines.append(Text(f"  {label}: {saga[key]}", style=style))
    if saga.get("restore_attempts"):
        lines.append(Text(f"  restores without progress: {saga['restore_attempts']}"))

    table = Table("#", "step", "bucket", "action", "status", "at", "took", "retries", "compensation", "last error",
                  title="stage timeline", title_justify="left")  # fmt: skip
    for row in data["timeline"]:
        if row["compensates"]:
            link = f"↩ undoes #{row['compensates']} {row.get('compensates_step') or ''}".rstrip()
        elif row["compensated_by"]:
            link = f"undone by #{row['compensated_by']}"
        else:
            link = ""
        status_style = {"succeeded": "green", "failed": "red", "started": "yellow"}.get(row["status"], "")
        error = row["errors"][-1] if row["errors"] else ""
        table.add_row(
            str(row["seq"]), row["step"], row["bucket"], row["action"], Text(row["status"], style=status_style),
            "+" + human_ms(row["offset_ms"]) if row["offset_ms"] is not None else "", human_ms(row["duration_ms"]),
            str(row["retries"] or ""), link, error[:60],
        )  # fmt: skip
    lines.append(table)
    undo = [r for r in data["timeline"] if r["compensates"]]
    if undo:
        lines.append(_compensation_line(undo))
    return Group(*lines)


def _compensation_line(undo: list[dict[str, Any]]) -> Text:
    """What the compensation did, in the words that are true: undone, failed, or still under way."""

    def part(row: dict[str, Any]) -> str:
        status = "" if row["status"] == "succeeded" else f"{row['status']}, "
        return f"{row['compensates_step'] or row['step']} (#{row['compensates']}, {status}{human_ms(row['duration_ms'])})"

    order = " → ".join(part(r) for r in undo)
    failed = [r for r in undo if r["status"] == "failed"]
    if failed:
        first = failed[0]["compensates_step"] or failed[0]["step"]
        return Text(f"  compensation failed at {first} (the saga needs an operator): {order}", style="red")
    if any(r["status"] != "succeeded" for r in undo):
        return Text(f"  compensating in reverse, under way: {order}", style="yellow")
    return Text(f"  compensated in reverse: {order}", style="yellow")


def cmd_list(args: argparse.Namespace) -> int:
    if args.state is not None:
        from essential.orchestration import SagaState

        known = [s.value for s in SagaState]
        if args.state not in known:
            raise InvalidRequest(f"unknown state {args.state!r}; use one of: {', '.join(known)}")
    if args.limit < 0:
        raise InvalidRequest("--limit must not be negative")
    since = parse_since(args.since)
    sagas = _read(lambda views: views.list(state=args.state, job=args.job, since=since, limit=args.limit))
    _print([s.model_dump(mode="json") for s in sagas], args.json, lambda: _saga_table(sagas))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    if args.minutes < 1:
        raise InvalidRequest("--minutes must be at least 1")
    data = _read(lambda views: views.stats(minutes=args.minutes))
    _print(data, args.json, lambda: render_stats(data))
    return 0


_SPARK = " ▁▂▃▄▅▆▇█"


def _sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top == 0:
        return _SPARK[0] * len(values)
    return "".join(_SPARK[min(len(_SPARK) - 1, round(v / top * (len(_SPARK) - 1)))] for v in values)


def render_stats(data: dict[str, Any]) -> Group:
    order = ["pending", "running", "waiting", "compensating", "committing", "completed", "aborted", "parked"]
    states = [s for s in order if s in data["totals"]] + sorted(set(data["totals"]) - set(order))
    table = Table("job", *states, "total", title="sagas by job and state", title_justify="left")
    for job, counts in data["by_job"].items():
        table.add_row(job, *[str(counts.get(s, "")) for s in states], str(sum(counts.values())))
    table.add_row(Text("all", style="bold"), *[Text(str(data["totals"].get(s, 0)), style="bold") for s in states],
                  Text(str(sum(data["totals"].values())), style="bold"))  # fmt: skip
    t = data["throughput"]
    per_min = [m["finished"] for m in t["per_minute"]]
    lines: list[Any] = [
        table,
        Text(f"last {data['window_minutes']} min: started {t['started']} ({t['started_per_min']}/min), "
             f"finished {t['finished']} ({t['finished_per_min']}/min)  finished per minute: {_sparkline(per_min)}"),
    ]  # fmt: skip
    oldest = data.get("oldest_running")
    if oldest:
        lines.append(Text(f"oldest running: {oldest['id']} {oldest['job']} {oldest['state']} for {oldest['age_s']:g}s"
                          f" on {oldest.get('where') or '?'}"))  # fmt: skip
    else:
        lines.append(Text("oldest running: none"))
    lines.append(Text(f"outbox: {data['outbox_unsent']} event(s) not yet relayed to Kafka"))
    if data.get("quarantined"):
        lines.append(Text(f"quarantine: {data['quarantined']} saga document(s) that do not read as sagas were set "
                          "aside (collection quarantine: each with its reason)", style="bold red"))  # fmt: skip
    if data["parked"]:
        parked = Table("id", "job", "since", "from", "reason", title=f"{data['parked_count']} parked saga(s)",
                       title_justify="left", title_style="bold magenta")  # fmt: skip
        for p in data["parked"]:
            parked.add_row(p["id"], p["job"], _local(p["since"], "%m-%d %H:%M:%S"), p.get("parked_from") or "",
                           (p.get("reason") or "")[:400])  # fmt: skip
        lines.append(parked)
    else:
        lines.append(Text("parked: none", style="green"))
    return Group(*lines)


def cmd_tail(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    count = 0

    async def follow(views: Any) -> int:
        nonlocal count
        stream = views.follow(saga=args.saga, job=args.job, since=since).__aiter__()
        deadline = None if args.timeout is None else asyncio.get_running_loop().time() + args.timeout
        try:
            while args.count is None or count < args.count:
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(stream.__anext__(), remaining)
                except asyncio.TimeoutError:
                    break
                count += 1
                if args.json:
                    print(json.dumps(event, default=str), flush=True)
                else:
                    console.print(_event_line(event))
        finally:
            await stream.aclose()
        return count

    if not args.json:
        what = " ".join(filter(None, [f"job {args.job}" if args.job else "", f"saga {args.saga}" if args.saga else ""]))
        err_console.print(f"[dim]following lifecycle events{' of ' + what if what else ''} (Ctrl-C to stop)…[/]")
    _read(follow)
    return 0


def _event_line(event: dict[str, Any]) -> Text:
    data = event.get("data") or {}
    kind = event.get("type", "?")
    detail = ""
    if kind == "saga.stage.completed":
        undo = f" ↩#{data['compensates']}" if data.get("compensates") else ""
        detail = f"#{data.get('seq')} {data.get('step')} {data.get('action')} {data.get('status')}{undo}"
    elif data.get("reason"):
        detail = str(data["reason"])
    style = {"saga.completed": "green", "saga.aborted": "red", "saga.parked": "magenta", "saga.started": "cyan"}
    return Text.assemble(
        (_local(event.get("at"), "%H:%M:%S.%f")[:-3] + "  ", "dim"), (f"{kind:<21}", style.get(kind, "")),
        f" {event.get('saga')}  {event.get('job')}  ", _state(str(event.get("state"))), f"  {detail}",
    )  # fmt: skip


def cmd_abort(args: argparse.Namespace) -> int:
    saga = _client().abort(args.id, args.reason)
    _print(saga.model_dump(mode="json"), args.json, lambda: f"abort requested for {saga.id} ({saga.state.value})")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    saga = _client().resume(args.id)
    _print(saga.model_dump(mode="json"), args.json, lambda: f"resumed {saga.id} ({saga.state.value})")
    return 0


def cmd_signal(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"--payload is not valid JSON ({exc.msg} at char {exc.pos})") from None
    saga = _client().signal(args.id, args.name, payload, key=args.key)
    _print(saga.model_dump(mode="json"), args.json,
           lambda: f"signal {args.name!r} stored for {saga.id} ({saga.state.value})")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="essential", description="Durable saga orchestrator on Ray and MongoDB")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Ray's own log lines and raylet warnings (else in <home>/logs/cli.log)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start embedded MongoDB, Kafka, a local Ray head, the supervisor, gateway and HTTP API")
    up.add_argument("--no-seed", dest="seed", action="store_false", help="do not create the example services' data")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `essential up` started").set_defaults(fn=cmd_down)
    url = sub.add_parser("url", help="print an address of the local stack: its HTTP API (default), dashboard or metrics")
    url.add_argument("what", nargs="?", choices=("api", "dashboard", "metrics"), default="api")
    url.set_defaults(fn=cmd_url)
    sub.add_parser("token", help="print the HTTP API's bearer token").set_defaults(fn=cmd_token)


    demo = sub.add_parser("demo", help="run the example sagas end to end")
    demo.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    demo.add_argument("--per-job", type=int, default=6, help="sagas per example job (default 6)")
    demo.set_defaults(fn=cmd_demo)

    start = sub.add_parser("start", help="start a saga of a registered job")
    start.add_argument("job")
    start.add_argument("--payload", default="{}", help="JSON object validated by the job's payload model")
    start.add_argument("--ttl", type=float, default=None, help="seconds (job default when omitted)")
    start.add_argument("--key", default=None, help="idempotency key: a repeated start returns the same saga")
    start.add_argument("--correlation-id", default=None)
    start.add_argument(
        "--wait", action="store_true",
        help="wait for the saga(s) to finish; exit 0 all completed, 1 some aborted or parked, 3 timed out",
    )  # fmt: skip
    start.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    start.add_argument(
        "--count", type=int, default=1,
        help="start N sagas (a batch, with progress bars); {n} in the payload's strings becomes 1..N",
    )  # fmt: skip
    start.add_argument("-q", "--quiet", action="store_true", help="print only the saga id(s), one per line")
    start.add_argument("--json", action="store_true")
    start.set_defaults(fn=cmd_start)

    wait = sub.add_parser("wait", help="wait for a saga to end; exit 0 completed, 1 aborted or parked, 3 timed out")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    wait.add_argument("--json", action="store_true")
    wait.set_defaults(fn=cmd_wait)

    for name, text in (("inspect", "a saga: where it runs, its stage timeline, retries, errors, compensations"),
                       ("status", "alias of inspect")):  # fmt: skip
        inspect = sub.add_parser(name, help=text)
        inspect.add_argument("id")
        inspect.add_argument("--json", action="store_true", help="the saga, its stages and timeline as JSON")
        inspect.set_defaults(fn=cmd_inspect)

    lst = sub.add_parser("list", help="recent sagas, newest first")
    lst.add_argument("--state", default=None, help="pending, running, compensating, completed, aborted, parked …")
    lst.add_argument("--job", default=None)
    lst.add_argument("--since", default=None, help="created since: 30s, 10m, 2h, 1d or an ISO 8601 time")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(fn=cmd_list)

    stats = sub.add_parser("stats", help="counts by job and state, throughput, oldest running, parked sagas")
    stats.add_argument("--minutes", type=int, default=15, help="throughput window (default 15)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(fn=cmd_stats)

    tail = sub.add_parser("tail", help="follow lifecycle events as they happen (the outbox's change stream)")
    tail.add_argument("--job", default=None)
    tail.add_argument("--saga", default=None, help="only this saga's events")
    tail.add_argument("--since", default=None, help="first replay events since: 30s, 10m, 2h or an ISO time")
    tail.add_argument("--count", type=int, default=None, help="stop after N events")
    tail.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    tail.add_argument("--json", action="store_true", help="one JSON event per line")
    tail.set_defaults(fn=cmd_tail)

    abort = sub.add_parser("abort", help="abort a saga: its completed steps are compensated")
    abort.add_argument("id")
    abort.add_argument("--reason", default="aborted by operator")
    abort.add_argument("--json", action="store_true")
    abort.set_defaults(fn=cmd_abort)

    resume = sub.add_parser("resume", help="resume a parked saga from its last checkpoint")
    resume.add_argument("id")
    resume.add_argument("--json", action="store_true")
    resume.set_defaults(fn=cmd_resume)

    sig = sub.add_parser("signal", help="deliver a signal (an approval, a callback) to a saga; stored durably")
    sig.add_argument("id")
    sig.add_argument("name", help="e.g. identity.verified")
    sig.add_argument("--payload", default="null", help="JSON the waiting step receives")
    sig.add_argument("--key", default=None, help="deduplicates a repeated delivery")
    sig.add_argument("--json", action="store_true")
    sig.set_defaults(fn=cmd_signal)
    return parser


def _error(exc: BaseException) -> None:
    """One line on stderr; the message is text, never read as markup (it may quote brackets)."""
    err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose
    try:
        return int(args.fn(args) or 0)
    except (EssentialError, CorruptStackRecord) as exc:
        # an error raised inside an actor comes back wrapped with its remote traceback: say only the error
        _error(getattr(exc, "cause", None) or exc)
        return 2
    except RuntimeError as exc:
        from essential.actors.dev.stack import StackError

        if not isinstance(exc, StackError):
            raise
        _error(exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
