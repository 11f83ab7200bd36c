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
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from orchestration import EssentialError, InvalidRequest, Saga

from .settings import Settings, get_settings

console = Console()
err_console = Console(stderr=True)

STATE_STYLE = {
    "pending": "cyan", "running": "blue", "waiting": "magenta", "compensating": "yellow", "committing": "blue",
    "completed": "green", "aborted": "red", "parked": "bold magenta",
}  # fmt: skip
ENDED = ("completed", "aborted", "parked")


def _load_stack_env(settings: Settings) -> Settings:
    """Point at the stack `essential up` recorded, unless the environment names the servers itself."""
    from .stack import LocalStack

    stack = LocalStack(settings)
    if stack.state() is None:
        return settings
    try:
        env = stack.env()
    except RuntimeError:
        return settings
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    get_settings.cache_clear()
    return get_settings()


def _client() -> Any:
    """A client of ESSENTIAL_RAY_ADDRESS, or else of the stack `essential up` recorded."""
    from .client import EssentialClient
    from .stack import LocalStack

    settings = get_settings()
    if not settings.ray_address:
        stack = LocalStack(settings)
        if stack.state() is None:
            raise EssentialError("no Ray cluster: run `essential up` first, or set ESSENTIAL_RAY_ADDRESS")
        os.environ.update(stack.env())
        get_settings.cache_clear()
        settings = get_settings()
    return EssentialClient(settings, address=settings.ray_address)


def _read(view: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run a read-only view against MongoDB directly (works while Ray is down or busy)."""
    from pymongo import AsyncMongoClient
    from pymongo.errors import ServerSelectionTimeoutError

    from persistence.connection import new_client
    from persistence.views import SagaViews

    settings = get_settings()
    if "ESSENTIAL_MONGODB_URI" not in os.environ:
        settings = _load_stack_env(settings)

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


def _ms(value: float | None) -> str:
    """Milliseconds, readable: ``65.2 ms``, ``7.32 s``, ``3.5 min``."""
    if value is None:
        return ""
    if value < 1000:
        return f"{value:.1f} ms"
    if value < 60_000:
        return f"{value / 1000:.2f} s"
    return f"{value / 60_000:,.1f} min"


def _saga_table(sagas: list[Saga]) -> Table:
    table = Table("id", "job", "state", "created", "updated", "where / why", title=f"{len(sagas)} saga(s)")
    for s in sagas:
        why = s.error or s.parked_reason or getattr(s, "waiting_for", None) or ""
        if not why and s.state.value in ("running", "compensating", "committing"):
            why = s.lease.owner or ""
        table.add_row(
            s.id, s.job, _state(s.state.value), _local(s.createdAt, "%m-%d %H:%M:%S"), _local(s.updatedAt),
            why[:70],
        )  # fmt: skip
    return table


def _print(data: Any, as_json: bool, render: Callable[[], Any]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        console.print(render())


# -- commands -------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from .stack import LocalStack

    stack = LocalStack(get_settings())
    with console.status("starting embedded MongoDB, Kafka and a local Ray head…"):
        info = stack.up()
        _client()  # creates the supervisor so it starts sweeping at once
        _start_gateway()
        http = _start_http()  # issue 5: the recorded-saga HTTP API (Ray Serve)
    console.print("[bold green]Essential is up[/]")
    console.print(f"  MongoDB:       {info['mongodb']['address']}")
    console.print(f"  Kafka:         {info['kafka']['address']}")
    console.print(f"  Ray:           {info['ray']['address']}")
    console.print(f"  Ray dashboard: {info['ray']['dashboard_url']}")
    if http:
        console.print(f"  HTTP API:      {http}")
    console.print("Use it from a shell with:")
    for key, value in stack.env().items():
        console.print(f"  export {key}={value}")
    console.print("Stop it with: [bold]essential down[/]")
    return 0


def _start_http() -> str | None:
    """Issue 5: Ray Serve bound to ESSENTIAL_HTTP_HOST with the recorded-saga API; what to print about it."""
    try:
        from .http_api import ensure_token, start_http
    except ImportError:  # Ray Serve not installed
        return None
    settings = get_settings()
    try:
        token = ensure_token(settings)
        address = start_http(settings, token=token)
    except Exception as exc:  # noqa: BLE001 - the rest of the stack is usable without it
        return f"[red]not started[/] ({type(exc).__name__}: {exc})"
    where = "ESSENTIAL_HTTP_TOKEN" if settings.http_token else f"{settings.home}/http_token"
    return f"{address}  (Authorization: Bearer {token} - from {where})"


def _start_gateway() -> None:
    try:
        from .gateway import ensure_gateway
    except ImportError:  # the Kafka gateway is optional on a cluster without Kafka
        return
    ensure_gateway(get_settings())


def cmd_down(args: argparse.Namespace) -> int:
    from .stack import LocalStack

    stopped = LocalStack(get_settings()).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(per_job=args.per_job, keep=args.keep)


def cmd_start(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"--payload is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if args.count < 1:
        raise InvalidRequest("--count must be at least 1")
    client = _client()
    if args.count > 1:
        return _start_batch(client, args, payload)
    saga_id = client.start(
        args.job, payload, ttl=args.ttl, idempotency_key=args.key, correlation_id=args.correlation_id
    )
    if args.wait:
        saga = client.wait(saga_id, timeout=args.timeout)
        _print(saga.model_dump(mode="json"), args.json, lambda: _saga_table([saga]))
        return 0 if saga.state.value == "completed" else 1
    _print({"id": saga_id}, args.json, lambda: f"started saga [bold]{saga_id}[/]")
    return 0


BATCH_CHUNK = 50


def _progress() -> Progress:
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())  # fmt: skip
    # progress goes to stderr: stdout stays clean for --json
    return Progress(*columns, console=err_console, transient=False)


def _start_batch(client: Any, args: argparse.Namespace, payload: dict[str, Any]) -> int:
    """``start --count N``: start in chunks, then (with --wait) follow them to the end, with progress bars."""
    requests = [
        {"job": args.job, "payload": payload, "ttl": args.ttl, "correlation_id": args.correlation_id,
         "idempotency_key": f"{args.key}:{i}" if args.key else None}
        for i in range(args.count)
    ]  # fmt: skip
    ids: list[str] = []
    with _progress() as progress:
        started = progress.add_task("started", total=len(requests), note="")
        for i in range(0, len(requests), BATCH_CHUNK):
            ids += client.start_many(requests[i : i + BATCH_CHUNK])
            progress.update(started, completed=len(ids))
        if not args.wait:
            states: dict[str, str] = {}
        else:
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
        _print({"ids": ids}, args.json, lambda: f"started {len(ids)} saga(s) of [bold]{args.job}[/]")
        return 0
    counts = Counter(states.get(i, "?") for i in ids)
    data = {"ids": ids, "states": states, "counts": dict(counts)}

    def render() -> Table:
        table = Table("state", "sagas", title=f"{len(ids)} saga(s) of {args.job}")
        for state, n in sorted(counts.items()):
            table.add_row(_state(state), str(n))
        return table

    _print(data, args.json, render)
    return 0 if counts.get("completed", 0) == len(ids) else 1


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
    took = f" · took {_ms(data.get('duration_ms'))}" if data.get("duration_ms") is not None else ""
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
            "+" + _ms(row["offset_ms"]) if row["offset_ms"] is not None else "", _ms(row["duration_ms"]),
            str(row["retries"] or ""), link, error[:60],
        )  # fmt: skip
    lines.append(table)
    undo = [r for r in data["timeline"] if r["compensates"]]
    if undo:
        order = " → ".join(f"{r['compensates_step'] or r['step']} (#{r['compensates']}, {_ms(r['duration_ms'])})"
                           for r in undo)  # fmt: skip
        lines.append(Text(f"  compensated in reverse: {order}", style="yellow"))
    return Group(*lines)


def cmd_list(args: argparse.Namespace) -> int:
    if args.state is not None:
        from orchestration import SagaState

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
    if data["parked"]:
        parked = Table("id", "job", "since", "from", "reason", title=f"{data['parked_count']} parked saga(s)",
                       title_justify="left", title_style="bold magenta")  # fmt: skip
        for p in data["parked"]:
            parked.add_row(p["id"], p["job"], _local(p["since"], "%m-%d %H:%M:%S"), p.get("parked_from") or "",
                           (p.get("reason") or "")[:120])  # fmt: skip
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


def cmd_bench(args: argparse.Namespace) -> int:
    """The issue-7 benchmark (the same as ``make bench``); its own flags follow ``bench``."""
    from bench.saga_bench import main as bench_main

    forwarded = list(args.bench_args)
    if forwarded[:1] == ["--"]:
        forwarded = forwarded[1:]
    return bench_main(forwarded)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="essential", description="Durable saga orchestrator on Ray and MongoDB")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="start embedded MongoDB, Kafka and a local Ray head").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `essential up` started").set_defaults(fn=cmd_down)

    bench = sub.add_parser(
        "bench", help="benchmark baseline, naive, dedicated, shared and pooled placement (flags: essential bench -- --help)"
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="flags for the benchmark, e.g. --sagas 200")
    bench.set_defaults(fn=cmd_bench)

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
    start.add_argument("--wait", action="store_true", help="wait for the saga to finish")
    start.add_argument("--timeout", type=float, default=120.0)
    start.add_argument("--count", type=int, default=1, help="start N sagas (a batch, with progress bars)")
    start.add_argument("--json", action="store_true")
    start.set_defaults(fn=cmd_start)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except EssentialError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return 2
    except RuntimeError as exc:
        from .stack import StackError

        if not isinstance(exc, StackError):
            raise
        err_console.print(f"[bold red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
