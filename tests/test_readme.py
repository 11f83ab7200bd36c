"""The README, run as a new user would run it: every command and snippet, in its order, from a fresh shell.

The commands come from the README itself (``tests/readme_blocks.py`` says how
a block is read), so the two cannot drift apart: a block that stops working,
or whose output no longer says what the README shows, fails here. The shell
is scrubbed as a newcomer's would be: no ``RAY_*``, no ``ESSENTIAL_*`` but a
fresh ``ESSENTIAL_HOME`` and free ports (so the run never meets the machine's
other servers), ``PATH`` without the virtual environment. The walkthrough
starts with ``essential up`` and ends with ``essential down``; afterwards no
process the stack started may be alive (checked by PID and by session).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from essential.actors.dev.mongodb import free_port
from tests.readme_blocks import Block, missing_lines, read_blocks

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK_TIMEOUT = 900.0
#: what Ray writes to a driver's terminal by itself; the CLI keeps it in its log file
RAY_NOISE = ("INFO worker.py", "(raylet)", "Traceback", "INFO serve")


def scrubbed_env(home: Path) -> dict[str, str]:
    """A newcomer's shell: no Essential or Ray variables, the machine's plain PATH, our own home and ports."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),  # ~/.ray/auth_token: the machine's Ray token
        "LANG": "C.UTF-8",
        "ESSENTIAL_HOME": str(home),
        "ESSENTIAL_MONGODB_PORT": str(free_port()),
        "ESSENTIAL_KAFKA_PORT": str(free_port()),
        "ESSENTIAL_RAY_PORT": str(free_port()),
        "ESSENTIAL_DASHBOARD_PORT": str(free_port()),
        "ESSENTIAL_HTTP_PORT": str(free_port()),
    }


def _marker(kind: str, n: int) -> str:
    return f"@@readme-{kind}-{n}@@"


def run_console(block: Block, env: dict[str, str]) -> list[tuple[str, str, int]]:
    """Run a console block's commands in one shell; (command, output, exit code) for each."""
    commands = block.commands()
    script = ["cd " + _quote(str(REPO))]
    for n, command in enumerate(commands):
        script += [f"echo {_marker('start', n)}", f"{{ {command.text}\n}} 2>&1", f"echo {_marker('rc', n)}$?"]
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT,
    )  # fmt: skip
    out = proc.stdout
    results = []
    for n, command in enumerate(commands):
        start, rc = _marker("start", n), _marker("rc", n)
        assert start in out and rc in out, (
            f"README line {block.line}: the shell stopped before `{command.text}`\n{out}\n{proc.stderr}"
        )
        body, _, rest = out.split(start, 1)[1].partition(rc)
        results.append((command.text, body.strip("\n"), int(rest.split("\n", 1)[0])))
    return results


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def check_block(block: Block, env: dict[str, str]) -> None:
    where = f"README line {block.line}"
    if block.lang == "console":
        for (command, output, code), expected in zip(run_console(block, env), block.commands()):
            assert code == expected.exit_code, f"{where}: `{command}` exited {code}, not {expected.exit_code}:\n{output}"
            missing = missing_lines(expected.expected, output)
            assert not missing, f"{where}: `{command}` did not print {missing}; it printed:\n{output}"
            if command.lstrip().startswith(".venv/bin/essential"):
                noise = [line for line in output.splitlines() if any(n in line for n in RAY_NOISE)]
                assert not noise, f"{where}: `{command}` let Ray's own lines through: {noise}"
        return
    if block.lang == "python":
        argv = [str(REPO / ".venv" / "bin" / "python"), "-c", block.text]
    else:
        argv = ["bash", "--noprofile", "--norc", "-e", "-c", block.text]
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{where}: the {block.lang} block exited {proc.returncode}:\n{output}"
    missing = missing_lines(block.expected, proc.stdout)
    assert not missing, f"{where}: the {block.lang} block did not print {missing}; it printed:\n{output}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and _alive(int(entry.name)):
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def stack_pids(home: Path) -> dict[str, list[int]]:
    """Every PID the recorded stack names, by component (the Ray head's own processes included)."""
    import json

    record = json.loads((home / "stack.json").read_text())
    pids = {name: [int(record[name]["pid"])] for name in ("mongodb", "kafka", "ray")}
    pids["ray"] += [int(p) for p in record["ray"].get("ray_pids", [])]
    return pids


def test_readme_blocks_are_all_run_or_say_why_not() -> None:
    blocks = read_blocks(README)
    run = [b for b in blocks if b.runs]
    assert run, "the README has no runnable block"
    commands = [c.text for b in run if b.lang == "console" for c in b.commands()]
    assert commands[0].endswith("essential up"), "the walkthrough starts the stack first"
    assert any(c.endswith("essential down") for c in commands), "the walkthrough stops the stack"
    for block in blocks:
        if block.lang in ("console", "bash", "sh", "python") and block.skip is not None:
            assert len(block.skip) > 10, f"README line {block.line}: say why the block is not run"


#: the HTTP port Ray gives a dashboard agent when nobody says otherwise
RAY_DEFAULT_AGENT_PORT = 52365


@pytest.fixture
def another_ray_head_on_the_machine() -> Iterator[None]:
    """What another Ray head (a second deployment, the test suite's own Ray, a `ray start` long
    gone) does to a new one: it holds the default dashboard-agent port, and it was the last cluster
    recorded in Ray's `ray_current_cluster`, where Ray Jobs look up their driver's address. Both
    are set up here whether or not such a head runs."""
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.exists() else None
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text(f"127.0.0.1:{free_port()}")  # a cluster started last and gone since
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", RAY_DEFAULT_AGENT_PORT))
            holder.listen()
        except OSError:  # taken already: by another Ray head, which is the point
            pass
        try:
            yield
        finally:
            if before is None:
                current.unlink(missing_ok=True)
            else:
                current.write_text(before)


@pytest.mark.slow
def test_every_readme_command_works_from_a_fresh_shell(tmp_path: Path, another_ray_head_on_the_machine: None) -> None:
    """`essential up`, the CLI, Python, recorded-saga, HTTP and Ray Jobs examples, `essential down`: as written,
    also next to another Ray head (Ray Jobs were refused, then joined the other cluster)."""
    home = tmp_path / "home"
    env = scrubbed_env(home)
    blocks = [b for b in read_blocks(README) if b.runs]
    pids: dict[str, list[int]] = {}
    try:
        for block in blocks:
            check_block(block, env)
            if not pids and (home / "stack.json").exists():
                pids = stack_pids(home)
    finally:
        if (home / "stack.json").exists():  # a failed block: stop what the README started
            subprocess.run([str(REPO / ".venv" / "bin" / "essential"), "down"], env=env, cwd=REPO, timeout=120)
    assert pids, "the README's `essential up` recorded the stack"
    assert not (home / "stack.json").exists(), "`essential down` cleared the record"
    left = {name: [p for p in group if _alive(p)] for name, group in pids.items()}
    left["ray session"] = _session_members(pids["ray"][0])
    assert not any(left.values()), f"processes of the stack still alive after `essential down`: {left}"


if __name__ == "__main__":  # list what would run: python -m tests.test_readme
    for b in read_blocks(README):
        print(b.line, b.lang, "run" if b.runs else f"not run ({b.skip})" if b.skip else "data", file=sys.stdout)
