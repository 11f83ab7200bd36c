"""The CLI and the local stack as a newcomer meets them: failures say what to fix and leave nothing behind."""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.test_readme import RAY_NOISE, REPO, _alive, _session_members, scrubbed_env

ESSENTIAL = str(REPO / ".venv" / "bin" / "essential")


def test_up_that_fails_stops_what_it_started(tmp_path: Path) -> None:
    """A mistake found after the servers started (a job module that does not import): one line, nothing left running."""
    home = tmp_path / "home"
    env = {**scrubbed_env(home), "ESSENTIAL_JOB_MODULES": "no_such_jobs"}
    started: list[int] = []
    proc = subprocess.Popen([ESSENTIAL, "up"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    record = home / "stack.json"
    while proc.poll() is None:  # note every PID the stack records while it comes up (a progress poll)
        try:
            state = json.loads(record.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        for entry in state.values():
            if isinstance(entry, dict) and "pid" in entry and entry["pid"] not in started:
                started.append(int(entry["pid"]))
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    out, err = proc.communicate()
    assert proc.returncode == 2, out + err
    assert "no_such_jobs" in err and "ESSENTIAL_JOB_MODULES" in err and "Traceback" not in err, err
    assert "stopping what this command started" in err
    assert len(started) == 3, f"mongodb, kafka and ray were started first: {started}"
    assert not record.exists()
    assert not [p for p in started if _alive(p)], "every process `up` started is stopped again"
    assert not _session_members(started[-1]), "nothing of the Ray head's session is left"


def test_up_refuses_a_taken_http_port_before_starting_anything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = scrubbed_env(home)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["ESSENTIAL_HTTP_PORT"])))
        taken.listen()
        proc = subprocess.run([ESSENTIAL, "up"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "already in use" in proc.stderr and "ESSENTIAL_HTTP_PORT" in proc.stderr
    assert not (home / "stack.json").exists() and not (home / "mongo").exists(), "nothing was started"


def test_cli_without_a_stack_says_so_instead_of_reading_a_default_port(tmp_path: Path) -> None:
    """No recorded stack and no ESSENTIAL_MONGODB_URI / ESSENTIAL_RAY_ADDRESS: a clear error, never a guess."""
    env = scrubbed_env(tmp_path / "nothing-here")
    essential = ESSENTIAL
    for argv, variable in ((["list"], "ESSENTIAL_MONGODB_URI"), (["abort", "0" * 24], "ESSENTIAL_RAY_ADDRESS")):
        proc = subprocess.run([essential, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "no local stack is recorded" in proc.stderr and variable in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not proc.stdout.strip(), "nothing was read or listed"


def test_make_clean_keeps_saga_data_and_purge_asks_first(tmp_path: Path) -> None:
    """`make clean` removes the build only; `make purge` deletes .essential after a yes (or YES=1)."""
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    data = tmp_path / ".essential" / "mongo"
    data.mkdir(parents=True)
    (tmp_path / ".venv").mkdir()
    run: Any = lambda *argv, stdin="": subprocess.run(  # noqa: E731
        ["make", "-s", *argv], cwd=tmp_path, input=stdin, capture_output=True, text=True, timeout=60
    )
    assert run("clean").returncode == 0
    assert data.exists() and not (tmp_path / ".venv").exists(), "clean keeps .essential, removes the venv"
    refused = run("purge", stdin="n\n")
    assert refused.returncode != 0 and data.exists() and "kept .essential" in refused.stdout
    (tmp_path / ".essential" / "stack.json").write_text("{}")
    running = run("purge", "YES=1")
    assert running.returncode != 0 and data.exists() and "make down" in running.stdout
    (tmp_path / ".essential" / "stack.json").unlink()
    assert run("purge", stdin="y\n").returncode == 0 and not (tmp_path / ".essential").exists()


def test_batch_payload_template() -> None:
    from essential.actors.cli.main import fill_template

    template = {"order_id": "o-{n}", "customer": "cust-{n:03d}", "items": [{"sku": "sku-{n}", "qty": 1}], "amount": 5}
    assert fill_template(template, 7) == {
        "order_id": "o-7", "customer": "cust-007", "items": [{"sku": "sku-7", "qty": 1}], "amount": 5
    }  # fmt: skip
    assert fill_template({"note": "no field"}, 3) == {"note": "no field"}


def test_demo_is_quiet_and_reads_as_people_read(tmp_path: Path) -> None:
    """`essential demo`: no Ray chatter on the terminal, latencies in units, outcomes in honest words."""
    env = scrubbed_env(tmp_path / "home")
    proc = subprocess.run([ESSENTIAL, "demo", "--per-job", "2"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "invariants hold" in out
    noise = [line for line in out.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, f"Ray's own lines reached the terminal: {noise}"
    header = next(line for line in out.splitlines() if "p50 latency" in line)
    assert "aborted" in header and "compensated" not in header, header
    rows = [line for line in out.splitlines() if "order:fulfillment" in line and ("ms" in line or " s " in line)]
    assert rows, "the p50 latency has a unit"
    assert not (tmp_path / "home" / "stack.json").exists(), "the demo stopped what it started"
