"""Start a batch of sagas from a Ray Job, wait for them, print a summary.

Submit it to a cluster (the head's dashboard port serves the Jobs REST API)::

    export RAY_AUTH_MODE=token                      # the cluster's token: RAY_AUTH_TOKEN or ~/.ray/auth_token
    ray job submit --address http://127.0.0.1:8265 --submission-id nightly-2026-11-25 -- \\
        python -m examples.ray_job_batch --job bank:transfer --sample --count 100 --batch nightly-2026-11-25

The entrypoint runs on the head node as a Ray driver: ``EssentialClient()``
joins the cluster through the ``RAY_ADDRESS`` that Ray Jobs set, and talks to
the cluster's supervisor like any client.  The sagas are the supervisor's
(detached actors), not this job's: if the job is stopped, they keep running.

Each saga gets the idempotency key ``<batch>:<n>``, so submitting the same
batch again (a retried job, a resubmission after a driver crash) starts
nothing twice: it returns the sagas already started and waits for them.

Payloads: ``--payload JSON`` (the same object for every saga), or ``--sample``
for fresh example payloads (``examples.data.sample_payload``; needs the example
data, ``--seed`` creates it).  Exit code 0 when every saga ended ``completed``
(or ``aborted``, with ``--allow-aborted``), 1 otherwise, 2 for bad input.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from typing import Any

from essential import EssentialError

SUMMARY_PREFIX = "essential-batch: "


def build_requests(args: argparse.Namespace) -> list[dict[str, Any]]:
    requests = []
    for n in range(args.count):
        if args.sample:
            from examples.data import sample_payload

            payload = sample_payload(args.job)
        else:
            payload = dict(args.payload)
        requests.append({"job": args.job, "payload": payload, "ttl": args.ttl, "idempotency_key": f"{args.batch}:{n}"})
    return requests


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.ray_job_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="bank:transfer", help="registered job name (default bank:transfer)")
    parser.add_argument("--count", type=int, default=10, help="sagas in the batch")
    parser.add_argument("--batch", default=None, help="batch id: idempotency keys are <batch>:<n> (default: random)")
    parser.add_argument("--payload", type=json.loads, default={}, help="JSON payload for every saga")
    parser.add_argument("--sample", action="store_true", help="a fresh example payload per saga")
    parser.add_argument("--seed", action="store_true", help="create the example data first (with --sample)")
    parser.add_argument("--ttl", type=float, default=None, help="seconds; the job's default when omitted")
    parser.add_argument("--chunk", type=int, default=50, help="start requests sent per round trip")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the whole batch")
    parser.add_argument("--no-wait", action="store_true", help="start the batch and exit")
    parser.add_argument("--allow-aborted", action="store_true", help="aborted sagas do not fail the job")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if not isinstance(args.payload, dict):
        parser.error("--payload must be a JSON object")
    args.batch = args.batch or f"batch-{uuid.uuid4().hex[:12]}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from essential import EssentialClient

    try:
        if args.seed:
            from examples.data import seed_demo

            asyncio.run(seed_demo())
        requests = build_requests(args)
        client = EssentialClient()
        began = time.monotonic()
        ids: list[str] = []
        for first in range(0, len(requests), args.chunk):
            ids += client.start_many(requests[first : first + args.chunk])
    except (EssentialError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"started {len(ids)} saga(s) of {args.job} as batch {args.batch}", flush=True)

    summary: dict[str, Any] = {"batch": args.batch, "job": args.job, "ids": ids}
    if args.no_wait:
        print(SUMMARY_PREFIX + json.dumps(summary), flush=True)
        return 0
    deadline = began + args.timeout
    states: dict[str, str] = {}
    while True:
        states = client.states(ids)
        unfinished = [i for i in ids if states.get(i) not in ("completed", "aborted", "parked")]
        if not unfinished or time.monotonic() >= deadline:
            break
        time.sleep(0.5)  # a progress poll, not synchronisation: the loop ends on the states
    counts = Counter(states.get(i, "missing") for i in ids)
    summary.update(states=dict(counts), seconds=round(time.monotonic() - began, 2))
    print(SUMMARY_PREFIX + json.dumps(summary), flush=True)
    ok = {"completed", "aborted"} if args.allow_aborted else {"completed"}
    return 0 if set(counts) <= ok else 1


if __name__ == "__main__":
    sys.exit(main())
