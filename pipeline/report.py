"""``rlhf report RUN``: one self-contained HTML page about a run, read from the store.

The page needs no network to open: the stage graph and every curve are inline SVG (drawn
by matplotlib, the library evaluate already plots with: the curves are static, which a
page that must open offline and print well can afford), evaluate's plots are embedded
as data URIs. It shows the stages as a graph with their state and duration, a table of
config hashes, inputs, outputs and manifests, each stage's curves, the evaluation with
its confidence interval, and the sample answers of the RL stages side by side over time.
"""

from __future__ import annotations

import base64
import html
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobs import store
from jobs.contract import MANIFEST, METRICS, PROGRESS, SAMPLES, Manifest
from jobs.plots import draw_curves
from pipeline.status import StageStatus, duration, run_stages, run_status, seconds_between

COLOURS = {"finished": "#2e7d32", "started": "#f9a825", "failed": "#c62828", "pending": "#9e9e9e"}


def records(status: StageStatus, name: str) -> list[dict[str, Any]]:
    """A JSON-lines file of the stage: the finished output's, else the live copy."""
    folder = status.output if status.state == "finished" else store.join(status.output, PROGRESS)
    uri = store.join(folder, name)
    if not store.exists(uri):
        return []
    return [json.loads(line) for line in store.read_text(uri).splitlines() if line.strip()]


def link(uri: str, page: Path, text: str | None = None) -> str:
    """A link that works from the page: relative for a local store, the URI for S3."""
    href = uri if store.is_s3(uri) else os.path.relpath(store.local_path(uri), page.parent)
    return f'<a href="{html.escape(href)}">{html.escape(text or uri)}</a>'


def depths(stages: list[dict[str, Any]]) -> dict[str, int]:
    """Each stage's column in the graph: the longest chain of stages it needs."""
    depth: dict[str, int] = {}
    for stage in stages:  # run.json lists them in an order that puts needs first
        depth[stage["name"]] = 1 + max((depth[n] for n in stage["needs"] if n in depth), default=-1)
    return depth


def graph_svg(stages: list[dict[str, Any]], statuses: dict[str, StageStatus]) -> str:
    """The pipeline as boxes in columns by depth, arrows from each stage to those it feeds."""
    depth = depths(stages)
    rows: dict[int, int] = {}
    where: dict[str, tuple[int, int]] = {}
    width, height, gap_x, gap_y = 150, 46, 40, 16
    for stage in stages:
        column = depth[stage["name"]]
        row = rows.get(column, 0)
        rows[column] = row + 1
        where[stage["name"]] = (10 + column * (width + gap_x), 10 + row * (height + gap_y))
    parts = []
    for stage in stages:
        x2, y2 = where[stage["name"]]
        for need in stage["needs"]:
            if need in where:
                x1, y1 = where[need]
                parts.append(
                    f'<line x1="{x1 + width}" y1="{y1 + height / 2}" x2="{x2}" '
                    f'y2="{y2 + height / 2}" stroke="#777" marker-end="url(#arrow)"/>'
                )
    for stage in stages:
        x, y = where[stage["name"]]
        status = statuses[stage["name"]]
        note = status.state
        if status.manifest is not None:
            note = duration(
                seconds_between(status.manifest.started_at, status.manifest.finished_at)
            )
        elif status.progress is not None:
            note = status.progress.short()
        parts.append(
            f'<g class="stage {status.state}"><rect x="{x}" y="{y}" width="{width}" '
            f'height="{height}" rx="6" fill="{COLOURS[status.state]}"/>'
            f'<text x="{x + 8}" y="{y + 19}" fill="white" font-weight="bold">'
            f"{html.escape(stage['name'])}</text>"
            f'<text x="{x + 8}" y="{y + 37}" fill="white" font-size="11">'
            f"{html.escape(stage['stage'])} · {html.escape(note)}</text></g>"
        )
    total_w = 20 + (max(depth.values(), default=0) + 1) * (width + gap_x)
    total_h = 20 + max(rows.values(), default=1) * (height + gap_y)
    return (
        f'<svg id="graph" xmlns="http://www.w3.org/2000/svg" width="{total_w}" '
        f'height="{total_h}" viewBox="0 0 {total_w} {total_h}" font-family="sans-serif" '
        'font-size="13">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z" fill="#777"/></marker></defs>'
        + "".join(parts)
        + "</svg>"
    )


def stage_table(statuses: list[StageStatus], page: Path) -> str:
    head = "<tr><th>stage</th><th>state</th><th>time</th><th>config</th><th>inputs</th>"
    head += "<th>output</th></tr>"
    rows = []
    for status in statuses:
        manifest: Manifest | None = status.manifest
        if manifest is not None:
            when = (
                f"{html.escape(manifest.started_at)} → {html.escape(manifest.finished_at)}<br>"
                f"{duration(seconds_between(manifest.started_at, manifest.finished_at))}"
            )
            config = f"<code>{manifest.config_hash[:12]}</code><br>{html.escape(manifest.stage)}"
            inputs = "<br>".join(
                f"{link(ref.uri, page) if ref.kind != 'hub' else html.escape(ref.uri)} "
                f"<code>{ref.sha256[:8]}</code>"
                for ref in manifest.inputs
            )
            listed = link(store.join(status.output, MANIFEST), page, MANIFEST)
            output = f"{link(status.output, page)}<br>{listed} ({len(manifest.files)} files)"
        else:
            when = html.escape(status.progress.line()) if status.progress else ""
            config, inputs, output = "", "", link(status.output, page)
        rows.append(
            f'<tr><td><b>{html.escape(status.name)}</b></td><td class="{status.state}">'
            f"{status.state}</td><td>{when}</td><td>{config}</td><td>{inputs}</td>"
            f"<td>{output}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def evaluation(status: StageStatus) -> str:
    """The win rates of an evaluate stage, with their intervals, and its plots."""
    report_uri = store.join(status.output, "report.json")
    if status.state != "finished" or not store.exists(report_uri):
        return ""
    report = json.loads(store.read_text(report_uri))
    lines = []
    for judge in ("held_out", "judge", "proxy"):
        if judge in report:
            low, high = report[judge]["win_rate_ci95"]
            head = " (decides)" if report.get("judged_by") == judge else ""
            lines.append(
                f"<tr><td>{judge}{head}</td><td><b>{report[judge]['win_rate']:.3f}</b></td>"
                f"<td>{low:.3f} – {high:.3f}</td></tr>"
            )
    body = (
        f"<p>{report.get('prompts', '?')} held-out prompts; win rate of the candidate over "
        "the baseline (a tie counts half), 95% bootstrap interval.</p>"
        "<table><tr><th>judge</th><th>win rate</th><th>95% CI</th></tr>"
        + "".join(lines)
        + "</table>"
    )
    for plot in report.get("plots", {}).values():
        uri = store.join(status.output, plot["file"])
        if store.exists(uri):
            data = base64.b64encode(store.read_bytes(uri)).decode()
            body += f'<img alt="{html.escape(plot["file"])}" src="data:image/png;base64,{data}">'
    return f"<h3>{html.escape(status.name)}</h3>{body}"


def samples_table(status: StageStatus) -> str:
    """The sample answers: a row per prompt, a column per step."""
    rows = records(status, SAMPLES)
    if not rows:
        return ""
    steps = sorted({row["step"] for row in rows})
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    cells = {(row["prompt"], row["step"]): row for row in rows}
    head = "<tr><th>prompt</th>" + "".join(f"<th>step {s}</th>" for s in steps) + "</tr>"
    body = []
    for prompt in prompts:
        line = f"<tr><td>{html.escape(prompt)}</td>"
        for step in steps:
            row = cells.get((prompt, step))
            line += (
                "<td></td>"
                if row is None
                else f'<td>{html.escape(row["answer"])}<div class="num">reward '
                f"{row['reward']:.3g} · KL {row['kl']:.3g}</div></td>"
            )
        body.append(line + "</tr>")
    return (
        f'<h3>{html.escape(status.name)}</h3><table class="samples">{head}{"".join(body)}</table>'
    )


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1900px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.finished { color: #2e7d32; } td.started { color: #b28704; } td.pending { color: #777; }
td.failed { color: #c62828; }
table.samples td { max-width: 320px; }
.num { color: #666; font-size: 11px; margin-top: 4px; }
img, svg { max-width: 100%; height: auto; }
"""


def write_report(run_uri: str, page: Path) -> Path:
    """The report of the run at ``run_uri``, written to ``page``."""
    stages = run_stages(run_uri)
    statuses = run_status(run_uri)
    by_name = {s.name: s for s in statuses}
    described = json.loads(store.read_text(store.join(run_uri, "run.json")))
    sections = [
        f"<h1>Run {html.escape(described['run_id'])}</h1>",
        f"<p>pipeline <b>{html.escape(described['name'])}</b>, store "
        f"{link(run_uri, page)}; {sum(s.state == 'finished' for s in statuses)} of "
        f"{len(statuses)} stages finished; report written "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}</p>",
        "<h2>Stages</h2>",
        graph_svg(stages, by_name),
        stage_table(statuses, page),
    ]
    evaluations = "".join(
        evaluation(s) for s in statuses if s.manifest and s.manifest.stage == "evaluate"
    )
    if evaluations:
        sections += ["<h2>Evaluation</h2>", evaluations]
    samples = "".join(samples_table(s) for s in statuses)
    if samples:
        sections += ["<h2>Sample answers over training</h2>", samples]
    sections.append("<h2>Curves</h2>")
    for status in statuses:
        drawn, svg = draw_curves(status.name, records(status, METRICS))
        if drawn:
            sections.append(f'<h3>{html.escape(status.name)}</h3><div class="curves">{svg}</div>')
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>KubeRLHF run {html.escape(described['run_id'])}</title>"
        f"<style>{STYLE}</style></head><body>" + "\n".join(sections) + "</body></html>",
        encoding="utf-8",
    )
    return page
