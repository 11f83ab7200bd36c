"""The ``essential`` command line.

Bad input never shows a traceback: typed errors are printed as one line that
says what to fix, with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from orchestration import EssentialError, Saga

from .settings import get_settings

console = Console()
err_console = Console(stderr=True)


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


def _saga_table(sagas: list[Saga]) -> Table:
    table = Table("id", "job", "state", "created", "updated", "error", title=f"{len(sagas)} saga(s)")
    for s in sagas:
        table.add_row(
            s.id, s.job, s.state.value, s.createdAt.strftime("%H:%M:%S"), s.updatedAt.strftime("%H:%M:%S"),
            (s.error or s.parked_reason or "")[:60],
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
    console.print("[bold green]Essential is up[/]")
    console.print(f"  MongoDB:       {info['mongodb']['address']}")
    console.print(f"  Kafka:         {info['kafka']['address']}")
    console.print(f"  Ray:           {info['ray']['address']}")
    console.print(f"  Ray dashboard: {info['ray']['dashboard_url']}")
    console.print("Use it from a shell with:")
    for key, value in stack.env().items():
        console.print(f"  export {key}={value}")
    console.print("Stop it with: [bold]essential down[/]")
    return 0


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
        raise EssentialError(f"--payload is not valid JSON ({exc.msg} at char {exc.pos})") from None
    client = _client()
    saga_id = client.start(
        args.job, payload, ttl=args.ttl, idempotency_key=args.key, correlation_id=args.correlation_id
    )
    if args.wait:
        saga = client.wait(saga_id, timeout=args.timeout)
        _print(saga.model_dump(mode="json"), args.json, lambda: _saga_table([saga]))
        return 0 if saga.state.value == "completed" else 1
    _print({"id": saga_id}, args.json, lambda: f"started saga [bold]{saga_id}[/]")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = _client()
    saga = client.status(args.id)
    stages = client.stages(args.id)

    def render() -> Table:
        table = Table("seq", "step", "bucket", "action", "status", "retries", "ms", "compensates",
                      title=f"saga {saga.id} · {saga.job} v{saga.version} · {saga.state.value}")  # fmt: skip
        for s in stages:
            table.add_row(
                str(s.seq), s.step, s.bucket, s.action.value, s.status.value, str(s.meta.retry_count),
                f"{s.meta.duration_ms or 0:.1f}", str(s.compensates or ""),
            )  # fmt: skip
        return table

    data = {"saga": saga.model_dump(mode="json"), "stages": [s.model_dump(mode="json") for s in stages]}
    _print(data, args.json, render)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    sagas = _client().list(state=args.state, job=args.job, limit=args.limit)
    _print([s.model_dump(mode="json") for s in sagas], args.json, lambda: _saga_table(sagas))
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    saga = _client().abort(args.id, args.reason)
    _print(saga.model_dump(mode="json"), args.json, lambda: f"abort requested for {saga.id} ({saga.state.value})")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    saga = _client().resume(args.id)
    _print(saga.model_dump(mode="json"), args.json, lambda: f"resumed {saga.id} ({saga.state.value})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="essential", description="Durable saga orchestrator on Ray and MongoDB")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="start embedded MongoDB, Kafka and a local Ray head").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `essential up` started").set_defaults(fn=cmd_down)

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
    start.add_argument("--json", action="store_true")
    start.set_defaults(fn=cmd_start)

    status = sub.add_parser("status", help="a saga and its stages")
    status.add_argument("id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)

    lst = sub.add_parser("list", help="recent sagas")
    lst.add_argument("--state", default=None)
    lst.add_argument("--job", default=None)
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(fn=cmd_list)

    abort = sub.add_parser("abort", help="abort a saga: its completed steps are compensated")
    abort.add_argument("id")
    abort.add_argument("--reason", default="aborted by operator")
    abort.add_argument("--json", action="store_true")
    abort.set_defaults(fn=cmd_abort)

    resume = sub.add_parser("resume", help="resume a parked saga from its last checkpoint")
    resume.add_argument("id")
    resume.add_argument("--json", action="store_true")
    resume.set_defaults(fn=cmd_resume)
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
