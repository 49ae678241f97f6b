"""The benchmark still runs end to end (`python -m bench --smoke`); its numbers are not judged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_bench_smoke_produces_every_scenario_with_positive_numbers(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    assert data["receiver"]["kind"] in ("nginx", "python")
    assert _positive(data["machine"]["nproc"])
    scenarios = data["scenarios"]
    assert set(scenarios) == {
        "ceiling",
        "drain",
        "latency",
        "backend_cost",
        "peer",
        "scale",
        "fairness",
        "replicas",
        "retention",
        "ordered",
    }

    ceiling = scenarios["ceiling"]
    assert _positive(ceiling["requests_per_s"])
    assert all(_positive(run["requests_per_s"]) for run in ceiling["runs"])
    assert _positive(ceiling["sender_requests_per_s"])
    assert _positive(ceiling["after_drain_requests_per_s"])

    drain = scenarios["drain"]
    assert drain["events"] == 2000
    for key in ("deliveries_per_s", "after_startup_per_s", "seconds"):
        assert _positive(drain[key]), key

    latency = scenarios["latency"]
    points = latency["points"]
    # Fractions of the drain rate, then of the live capacity (producers and dispatcher together).
    assert [(p["basis"], p["load"]) for p in points] == [
        ("drain", 0.1),
        ("drain", 0.5),
        ("drain", 0.8),
        ("live", 0.5),
    ]
    assert _positive(latency["insert_capacity"])
    assert 0 < latency["live_capacity"] < min(latency["insert_capacity"], latency["drain_rate"])
    for p in points:
        for key in ("target_per_s", "achieved_per_s", "events", "p50_ms", "p99_ms", "max_ms"):
            assert _positive(p[key]), (p["load"], key)
        assert _positive(p["machine_load"]), p["load"]
        assert set(p["stages_ms"]) == {"to_fan_out", "fan_out_to_send", "http", "to_recorded"}
        assert _positive(p["stages_ms"]["to_fan_out"][0]), p["load"]
        # PostgreSQL's CPU split between the producers' backends and the dispatcher's (at the
        # smoke run's low rates a 1 s phase may use less than /proc's 10 ms tick).
        assert p["cores"]["pg_inserts"] >= 0, p["load"]
        assert p["cores"]["pg_dispatcher"] >= 0, p["load"]
    assert _positive(points[-1]["cores"]["pg_inserts"] + points[-1]["cores"]["pg_dispatcher"])

    cells = scenarios["backend_cost"]["cells"]
    assert {(c["producers"], c["mode"]) for c in cells} == {
        (n, mode) for n in (1, 16) for mode in ("no trigger", "busy", "idle")
    }
    assert all(_positive(c["inserts_per_s"]) for c in cells)
    assert _positive(scenarios["backend_cost"]["idle_notifications"])

    peer = scenarios["peer"]
    assert peer["events"] == 2000
    assert _positive(peer["deliveries_per_s"])
    assert peer["best"]["failed_jobs"] == 0
    assert all(_positive(run["deliveries_per_s"]) for run in peer["calibration"])

    scale = scenarios["scale"]
    # The small backlog twice before the large one and once after it.
    assert [r["events"] for r in scale["runs"]] == [1000, 1000, 4000, 1000]
    assert all(_positive(r["deliveries_per_s"]) for r in scale["runs"])
    assert _positive(scale["rate_ratio"])
    assert _positive(scale["large_peak_rss_mb"])

    fairness = scenarios["fairness"]
    for run in ("without", "with_hanging"):
        for key in ("healthy_per_s", "healthy_events", "latency_events", "p50_ms", "p99_ms"):
            assert _positive(fairness[run][key]), (run, key)
        assert fairness[run]["healthy_failed_attempts"] == 0, run
    assert fairness["with_hanging"]["hanging_endpoints"] == 5
    assert _positive(fairness["with_hanging"]["hanging_attempts"])
    assert _positive(fairness["throughput_ratio"])

    replicas = scenarios["replicas"]
    assert [replicas[k]["processes"] for k in ("one", "two")] == [1, 2]
    assert all(_positive(replicas[k]["deliveries_per_s"]) for k in ("one", "two"))
    assert _positive(replicas["ratio"])
    assert replicas["duplicate_sends"] == 0

    retention = scenarios["retention"]
    assert retention["succeeded"] == 5000
    assert retention["full"]["deliveries"] == 5000
    assert retention["full"]["attempts"] == 5000
    assert retention["kept"] == 250
    assert _positive(retention["deliveries_per_s"])
    assert retention["during"]["lock_waits"] == 0

    ordered = scenarios["ordered"]
    assert [r["mode"] for r in ordered["runs"]] == ["unordered", "many keys", "few keys"]
    for r in ordered["runs"]:
        assert r["events"] == 1000, r["mode"]
        assert _positive(r["deliveries_per_s"]), r["mode"]
        assert r["failed_attempts"] == 0, r["mode"]
        if r["ordered"]:
            assert r["key_overlaps"] == 0, r["mode"]
    assert _positive(ordered["runs"][2]["handovers"])
    assert _positive(ordered["runs"][2]["handover_p50_ms"])
    assert _positive(ordered["many_keys_ratio"])
    assert _positive(ordered["few_keys_ratio"])
    without, stuck = ordered["without_stuck"], ordered["with_stuck"]
    assert _positive(without["other_per_s"])
    assert _positive(stuck["other_per_s"])
    assert without["other_failed_attempts"] == stuck["other_failed_attempts"] == 0
    assert without["key_overlaps"] == stuck["key_overlaps"] == 0
    assert without["stuck_succeeded"] == without["stuck_events"] > 1
    assert stuck["stuck_succeeded"] == 0
    assert stuck["stuck_later_sent"] == 0
    assert stuck["stuck_seen_by_receiver"] == 1
    assert _positive(stuck["stuck_head_attempts"])
    assert _positive(ordered["stuck_ratio"])

    assert _positive(data["summary"]["drain / ceiling"])
    assert _positive(data["summary"]["drain / sender loop"])
    assert _positive(data["summary"]["drain / peer"])
    assert "results:" in proc.stdout


def test_a_run_whose_scenarios_all_failed_still_prints_its_summary() -> None:
    from bench.report import summary_table

    assert summary_table({}).splitlines()[0] == "summary"
