"""`make bench` keeps working: a tiny run of its Ray-free modes writes a record with every ratio.

Speed is never asserted here (that is what the benchmark reports); what is asserted is that the
benchmark runs, counts what it ran, and takes its ratios against the hand-written saga log.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_small_bench_run_records_ratios_to_the_hand_written_log(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.saga_bench", "--modes", "saga-log,runner", "--workloads", "pure",
         "--sagas", "12", "--no-memory", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [record_path] = tmp_path.glob("saga_bench_*.json")
    record = json.loads(record_path.read_text())
    rows = {(r["mode"], r["concurrency"]): r for r in record["results"]}
    assert set(rows) == {("saga-log", 32), ("saga-log", 1), ("runner", 32), ("runner", 1)}
    for (mode, concurrency), row in rows.items():
        expected = 12 if (mode, concurrency) == ("saga-log", 32) else 10  # at least 10 per row
        assert row["sagas"] == expected and row["completed"] + row["aborted"] == expected, row
        assert row["server"]["commands"] > 0 and row["cpu_ms_per_saga"]["own"] > 0, row
        ratios = row["ratios_to_saga_log"]
        assert set(ratios) == {"throughput", "p50", "own_cpu", "server_cpu", "server_commands"}
        if mode == "saga-log":
            assert all(value == 1.0 for value in ratios.values()), ratios
    # the reference is really the log at the same load: each ratio is the runner's figure over the log's
    for concurrency in (32, 1):
        runner, log = rows[("runner", concurrency)], rows[("saga-log", concurrency)]
        ratios = runner["ratios_to_saga_log"]
        assert ratios["server_commands"] == round(runner["server"]["commands"] / log["server"]["commands"], 2)
        assert ratios["own_cpu"] == round(runner["cpu_ms_per_saga"]["own"] / log["cpu_ms_per_saga"]["own"], 2)
    assert record_path.with_suffix(".txt").read_text().count("saga-log") >= 2, "the tables are kept as text"
    assert "ratios to the hand-written saga log" in proc.stdout
