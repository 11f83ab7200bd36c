"""Writes essential-dashboard.json (Grafana, Prometheus datasource) next to this file.

The JSON is committed; edit the panels here and run
``python monitoring/grafana/build_dashboard.py`` to regenerate it.
tests/test_operators.py checks that it charts every metric of
``actors/metrics.py`` and no other.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RATE = "$__rate_interval"
JOB = 'job=~"$job"'
DEP = 'deployment=~"$deployment"'

_ids = iter(range(1, 1000))


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend,
            "refId": ref}  # fmt: skip


def panel(title: str, targets: list[dict[str, Any]], x: int, y: int, *, w: int = 8, h: int = 8, unit: str = "short",
          kind: str = "timeseries", description: str = "") -> dict[str, Any]:  # fmt: skip
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return {
        "id": next(_ids),
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": targets,
    }


def row(title: str, y: int) -> dict[str, Any]:
    return {"id": next(_ids), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}  # fmt: skip


def quantiles(metric: str, by: str, selector: str) -> list[dict[str, Any]]:
    legend = " ".join("{{" + label + "}}" for label in by.split(", "))
    return [
        target(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
               f"p{int(q * 100)} {legend}")  # fmt: skip
        for q in (0.5, 0.95)
    ]


def build() -> dict[str, Any]:
    panels = [
        row("Sagas", 0),
        panel("Sagas started / min", [
            target(f"sum by (job) (rate(ray_essential_sagas_started_total{{{JOB}}}[{RATE}])) * 60", "{{job}}"),
        ], 0, 1, unit="short", description="accepted start requests (client, CLI, Kafka), by job"),
        panel("Sagas ended / min", [
            target(f"sum(rate(ray_essential_sagas_completed_total{{{JOB}}}[{RATE}])) * 60", "completed"),
            target(f"sum(rate(ray_essential_sagas_aborted_total{{{JOB}}}[{RATE}])) * 60", "aborted (compensated)"),
            target(f"sum(rate(ray_essential_sagas_parked_total{{{JOB}}}[{RATE}])) * 60", "parked"),
        ], 8, 1, description="completed, aborted and parked sagas"),
        panel("Saga duration (start to end)", quantiles("ray_essential_saga_duration_seconds", "job, state", JOB),
              16, 1, unit="s"),
        panel("Live saga actors", [
            target(f"sum by (placement) (ray_essential_live_saga_actors{{{DEP}}})", "{{placement}}"),
        ], 0, 9, description="dedicated: a saga:<id> actor each; shared: tasks in essential:host:<i> actors"),
        panel("Pending sagas (waiting for admission)", [
            target(f"sum(ray_essential_pending_sagas{{{DEP}}})", "pending"),
        ], 8, 9),
        panel("Parked sagas (need an operator)", [
            target(f"sum(ray_essential_parked_sagas{{{DEP}}})", "parked now"),
        ], 16, 9, kind="stat"),
        row("Stages", 17),
        panel("Stage duration by bucket", quantiles("ray_essential_stage_duration_seconds", "bucket, action",
                                                    f"{JOB}"), 0, 18, unit="s"),
        panel("Stages / s and mean duration", [
            target(f"sum by (state) (rate(ray_essential_stage_duration_seconds_count{{{JOB}}}[{RATE}]))", "{{state}} / s"),
            target(f"sum(rate(ray_essential_stage_duration_seconds_sum{{{JOB}}}[{RATE}])) / "
                   f"sum(rate(ray_essential_stage_duration_seconds_count{{{JOB}}}[{RATE}]))", "mean seconds"),
        ], 8, 18),
        panel("Step retries / min", [
            target(f"sum by (bucket, action) (rate(ray_essential_step_retries_total{{{JOB}}}[{RATE}])) * 60",
                   "{{bucket}} {{action}}"),
        ], 16, 18),
        panel("Compensations / min", [
            target(f"sum by (bucket, state) (rate(ray_essential_compensations_total{{{JOB}}}[{RATE}])) * 60",
                   "{{bucket}} {{state}}"),
        ], 0, 26, description="compensation stages run; failed ones park their saga"),
        panel("Restores / min", [
            target(f"sum by (job) (rate(ray_essential_restores_total{{{JOB}}}[{RATE}])) * 60", "{{job}}"),
        ], 8, 26, description="sagas restored from their last checkpoint after their actor or host died"),
        row("Outbox and Kafka", 34),
        panel("Outbox backlog", [
            target(f"sum by (outbox) (ray_essential_outbox_backlog{{{DEP}}})", "{{outbox}}"),
        ], 0, 35, description="rows not yet acknowledged by Kafka (events: lifecycle; commands: to participants)"),
        panel("Relay lag", [
            target(f"max by (outbox) (ray_essential_outbox_relay_lag_seconds{{{DEP}}})", "{{outbox}}"),
        ], 8, 35, unit="s", description="age of the oldest unsent row"),
        panel("Dead-lettered messages", [
            target("sum by (topic, code) (increase(ray_essential_dead_letters_total[5m]))", "{{topic}} {{code}}"),
        ], 16, 35, description="rejected commands and replies, per 5 minutes, by source topic and reason code"),
    ]
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 0, "label": "Datasource",
         "current": {}, "options": [], "refresh": 1},
        {"name": "job", "type": "query", "label": "Job", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "definition": "label_values(ray_essential_sagas_started_total, job)",
         "query": {"query": "label_values(ray_essential_sagas_started_total, job)", "refId": "jobs"},
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1},
        {"name": "deployment", "type": "query", "label": "Deployment (Ray namespace)",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "definition": "label_values(ray_essential_pending_sagas, deployment)",
         "query": {"query": "label_values(ray_essential_pending_sagas, deployment)", "refId": "deployments"},
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1},
    ]  # fmt: skip
    return {
        "uid": "essential-sagas",
        "title": "Essential: sagas",
        "description": "Essential's custom metrics, exported on Ray's metrics endpoint (see README, Operating Essential)",
        "tags": ["essential", "ray", "sagas"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": variables},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("essential-dashboard.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")
