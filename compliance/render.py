"""``report.json`` rendered: a self-contained HTML page (inline CSS and SVG plots, no script, nothing fetched)
and a PDF printed from it by headless Chromium.

The renderer reads nothing but the report dictionary, so every number on the page is one of report.json's
(axis ticks are derived from them). Sections are rendered in the order and under the headings that
report.json's ``sections`` lists: the one-screen summary first, the files and hashes in the last appendix.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from compliance.report import CAUSAL_LM, NOT_ASSESSED, build_report, is_not_assessed
from compliance.report_signature import sign_report
from protocols.canonical import atomic_write_bytes
from protocols.errors import ConfigError, ExternalToolError

FORMATS = ("html", "pdf", "json")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
CHROMIUM_TIMEOUT_S = 180
# Okabe-Ito: distinguishable with the common colour-vision deficiencies, and in greyscale print by marker.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
REFERENCE_COLOURS = ("#444444", "#B3261E", "#7B3294", "#1B7837")
STATUS_CLASS = {"met": "ok", "ok": "ok", "partial": "partial", "not met": "bad", "failed": "bad",
                NOT_ASSESSED: "na"}
CSS = """
body { font: 10.5pt/1.45 "DejaVu Sans", "Liberation Sans", Arial, sans-serif; color: #1a1a1a; margin: 24px auto;
       max-width: 1100px; padding: 0 16px; }
h1 { font-size: 19pt; margin: 0 0 4px; } h2 { font-size: 14pt; border-bottom: 2px solid #0072B2; margin-top: 30px;
     padding-bottom: 3px; break-after: avoid; } h3 { font-size: 11.5pt; margin: 18px 0 6px; break-after: avoid; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 9pt; width: 100%; }
th, td { border: 1px solid #c8c8c8; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eef3f8; } tr { break-inside: avoid; }
td.k { width: 28%; color: #333; background: #fafafa; }
code, .digest { font-family: "DejaVu Sans Mono", monospace; font-size: 8pt; word-break: break-all; }
.na { color: #8a5a00; background: #fff4d6; padding: 0 4px; border-radius: 3px; white-space: nowrap; }
.ok { color: #fff; background: #1b7f3b; } .partial { color: #1a1a1a; background: #ffd966; }
.bad { color: #fff; background: #b3261e; }
.badge { padding: 1px 6px; border-radius: 3px; font-weight: bold; white-space: nowrap; }
.banner { padding: 10px 14px; border-radius: 4px; margin: 12px 0; font-weight: bold; }
.statement { border-left: 4px solid #0072B2; background: #f2f7fc; padding: 8px 12px; margin: 8px 0; }
.meta { color: #555; font-size: 9pt; } svg { max-width: 100%; height: auto; margin: 8px 0; }
.charts { display: flex; flex-wrap: wrap; gap: 0 24px; } .charts > div { flex: 1 1 420px; }
#summary ul { margin: 4px 0 8px; padding-left: 20px; } #summary li { margin: 1px 0; }
.fields { color: #555; font-size: 8.5pt; }
nav ul { columns: 2; font-size: 9.5pt; list-style: none; padding-left: 0; }
@page { size: A4; margin: 12mm; }
@media print { body { margin: 0; max-width: none; } }
"""


# ------------------------------------------------------------------------------------------------ values
def _e(value: Any) -> str:
    return html.escape(str(value))


def _label(key: str) -> str:
    return key.replace("_", " ")


def fmt(value: Any) -> str:
    """One value as HTML: numbers compact, digests monospaced, "not assessed" marked, containers nested."""
    if value is None:
        return "&mdash;"
    if is_not_assessed(value):
        # The mark stays on one line; the reason after it, if any, wraps like any text.
        return f'<span class="na">{NOT_ASSESSED}</span>' + _e(value[len(NOT_ASSESSED):])
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return _e(value)
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, str):
        return f'<span class="digest">{_e(value)}</span>' if len(value) >= 64 and " " not in value else _e(value)
    if isinstance(value, dict):
        return kv_table(value) if value else "none"
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            return table(value)
        if any(isinstance(item, str) and len(item) > 40 for item in value):
            return "<ul>" + "".join(f"<li>{fmt(item)}</li>" for item in value) + "</ul>"
        return ", ".join(fmt(item) for item in value) or "none"
    return _e(value)


def badge(status: str) -> str:
    return f'<span class="badge {STATUS_CLASS.get(status, "na")}">{_e(status)}</span>'


def kv_table(mapping: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    rows = "".join(f'<tr><td class="k">{_e(_label(key))}</td><td>{fmt(mapping[key])}</td></tr>'
                   for key in (keys or mapping) if key in mapping)
    return f"<table>{rows}</table>"


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None,
          cell: Callable[[str, Any], str] = lambda column, value: fmt(value)) -> str:
    if not rows:
        return "<p>none</p>"
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{_e(_label(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(c, row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# ------------------------------------------------------------------------------------------------ plots
def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    span = high - low or abs(high) or 1.0
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _tick_label(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:,.0f}k"
    return f"{value:.6g}"


class _Plot:
    """The frame shared by the line and bar charts: axes, ticks, title and legend."""

    width, height, left, right, top, bottom = 760, 300, 64, 190, 28, 42

    def __init__(self, title: str, x_range: tuple[float, float], y_values: list[float], x_label: str,
                 y_label: str, y_floor: float | None = 0.0) -> None:
        low = min(y_values) if y_floor is None else min([y_floor, *y_values])
        self.y_ticks = _ticks(low, max(y_values))
        self.x_low, self.x_high = x_range
        self.y_low, self.y_high = self.y_ticks[0], self.y_ticks[-1]
        self.parts = [f'<text x="{self.width / 2 - self.right / 2}" y="17" text-anchor="middle" font-size="13" '
                      f'font-weight="bold">{_e(title)}</text>']
        plot_w, plot_h = self.width - self.left - self.right, self.height - self.top - self.bottom
        self.parts.append(f'<rect x="{self.left}" y="{self.top}" width="{plot_w}" height="{plot_h}" fill="#fff" '
                          'stroke="#888"/>')
        for tick in self.y_ticks:
            y = self.y(tick)
            self.parts.append(f'<line x1="{self.left}" x2="{self.left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                              f'stroke="#e3e3e3"/><text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end" '
                              f'font-size="10">{_tick_label(tick)}</text>')
        for tick in _ticks(self.x_low, self.x_high, 8):
            if self.x_low <= tick <= self.x_high and float(tick).is_integer():
                x = self.x(tick)
                self.parts.append(f'<text x="{x:.1f}" y="{self.top + plot_h + 15}" text-anchor="middle" '
                                  f'font-size="10">{int(tick)}</text>')
        self.parts.append(f'<text x="{self.left + plot_w / 2}" y="{self.height - 6}" text-anchor="middle" '
                          f'font-size="11">{_e(x_label)}</text>')
        self.parts.append(f'<text transform="translate(14 {self.top + plot_h / 2}) rotate(-90)" '
                          f'text-anchor="middle" font-size="11">{_e(y_label)}</text>')
        self.legend_rows = 0

    def x(self, value: float) -> float:
        span = (self.x_high - self.x_low) or 1.0
        return self.left + (value - self.x_low) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = (self.y_high - self.y_low) or 1.0
        return self.top + (1 - (value - self.y_low) / span) * (self.height - self.top - self.bottom)

    def legend(self, name: str, colour: str, dashed: bool = False) -> None:
        x, y = self.width - self.right + 12, self.top + 8 + 16 * self.legend_rows
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        self.parts.append(f'<line x1="{x}" x2="{x + 18}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2.5"'
                          f'{dash}/><text x="{x + 24}" y="{y + 4}" font-size="10">{_e(name)}</text>')
        self.legend_rows += 1

    def svg(self, description: str) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" '
                f'width="{self.width}" height="{self.height}" role="img" aria-label="{_e(description)}">'
                + "".join(self.parts) + "</svg>")


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               references: dict[str, float] | None = None, from_zero: bool = True) -> str:
    """One line per series; ``references`` are dashed horizontal lines (a cap, a baseline)."""
    series = {name: points for name, points in series.items() if points}
    references = references or {}
    ys = [y for points in series.values() for _, y in points] + list(references.values())
    xs = [x for points in series.values() for x, _ in points]
    if not ys or not xs:
        return "<p>nothing to plot</p>"
    # Headroom above the highest value, so a line at a cap is not drawn on the frame.
    top = max(ys) + 0.04 * ((max(ys) - (0.0 if from_zero else min(ys))) or 1.0)
    plot = _Plot(title, (min(xs), max(xs)), [*ys, top], x_label, y_label, y_floor=0.0 if from_zero else None)
    for index, (name, points) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        path = " ".join(f"{plot.x(x):.1f},{plot.y(y):.1f}" for x, y in points)
        plot.parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        if len(points) <= 60:
            plot.parts.extend(f'<circle cx="{plot.x(x):.1f}" cy="{plot.y(y):.1f}" r="2.2" fill="{colour}"/>'
                              for x, y in points)
        plot.legend(name, colour)
    for index, (name, value) in enumerate(references.items()):
        colour = REFERENCE_COLOURS[index % len(REFERENCE_COLOURS)]
        plot.parts.append(f'<line x1="{plot.x(plot.x_low):.1f}" x2="{plot.x(plot.x_high):.1f}" '
                          f'y1="{plot.y(value):.1f}" y2="{plot.y(value):.1f}" stroke="{colour}" stroke-width="1.5" '
                          'stroke-dasharray="5 3"/>')
        plot.legend(name, colour, dashed=True)
    return plot.svg(title)


def stacked_bars(title: str, categories: list[int], series: dict[str, list[float]], x_label: str,
                 y_label: str) -> str:
    """One bar per category (round), stacked by series (site)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(categories))]
    if not categories or not any(totals):
        return "<p>nothing to plot</p>"
    plot = _Plot(title, (categories[0] - 0.5, categories[-1] + 0.5), totals, x_label, y_label)
    width = 0.75 * (plot.x(1) - plot.x(0))
    base = [0.0] * len(categories)
    for index, (name, values) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        for i, (category, value) in enumerate(zip(categories, values)):
            if value:
                top, bottom = plot.y(base[i] + value), plot.y(base[i])
                plot.parts.append(f'<rect x="{plot.x(category) - width / 2:.1f}" y="{top:.1f}" width="{width:.1f}" '
                                  f'height="{bottom - top:.1f}" fill="{colour}"/>')
                base[i] += value
        plot.legend(name, colour)
    return plot.svg(title)


def bar_chart(title: str, rows: list[dict[str, Any]], value_label: str,
              marker_label: str | None = None) -> str:
    """One horizontal bar per row (``label``, ``value``, ``colour``; ``text`` overrides the printed value), with an
    optional per-row marker (``marker``: a cap, drawn as a red line over its bar). A row without a finite value
    gets its text and no bar, never a bar of made-up length."""
    finite = [row["value"] for row in rows if isinstance(row.get("value"), (int, float)) and math.isfinite(row["value"])]
    markers = [row["marker"] for row in rows if isinstance(row.get("marker"), (int, float))]
    if not rows:
        return "<p>nothing to plot</p>"
    ticks = _ticks(0.0, max([*finite, *markers, 0.0]) * 1.05 or 1.0, 4)
    width, label_w, value_w, row_h, top = 460, 150, 64, 24, 24
    plot_w, height = width - label_w - value_w, top + row_h * len(rows) + 34
    high = ticks[-1] or 1.0

    def x(value: float) -> float:
        return label_w + value / high * plot_w

    parts = [f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="12" font-weight="bold">{_e(title)}'
             "</text>"]
    for tick in ticks:
        parts.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top - 4}" y2="{top + row_h * len(rows)}" '
                     f'stroke="#e3e3e3"/><text x="{x(tick):.1f}" y="{top + row_h * len(rows) + 13}" '
                     f'text-anchor="middle" font-size="9">{_tick_label(tick)}</text>')
    for index, row in enumerate(rows):
        y = top + index * row_h
        value = row.get("value")
        drawn = isinstance(value, (int, float)) and math.isfinite(value)
        parts.append(f'<text x="{label_w - 6}" y="{y + row_h / 2 + 4}" text-anchor="end" font-size="10">'
                     f"{_e(row['label'])}</text>")
        if drawn:
            parts.append(f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{max(x(value) - label_w, 0.5):.1f}" '
                         f'height="{row_h - 8}" fill="{row["colour"]}"/>')
        text = row.get("text") or (fmt(value) if drawn else "none")
        parts.append(f'<text x="{(x(value) if drawn else label_w) + 4:.1f}" y="{y + row_h / 2 + 4}" font-size="9.5">'
                     f"{text}</text>")
        marker = row.get("marker")
        if isinstance(marker, (int, float)):
            parts.append(f'<line x1="{x(marker):.1f}" x2="{x(marker):.1f}" y1="{y + 1}" y2="{y + row_h - 1}" '
                         f'stroke="{REFERENCE_COLOURS[1]}" stroke-width="2.5"/>')
    axis = _e(value_label) + (f' &#160; <tspan fill="{REFERENCE_COLOURS[1]}">| {_e(marker_label)}</tspan>'
                              if marker_label and markers else "")
    parts.append(f'<text x="{label_w + plot_w / 2}" y="{height - 4}" text-anchor="middle" font-size="10">{axis}'
                 "</text>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{_e(title)}">' + "".join(parts) + "</svg>")


# ------------------------------------------------------------------------------------------------ sections
VERDICT_CLASS = {"verified": "ok", "incomplete": "partial", "failed": "bad"}
VERDICT_TEXT = {"verified": "Verified", "incomplete": "Verification INCOMPLETE", "failed": "Verification FAILED"}
ROLE_COLOURS = {"student": PALETTE[0], "teacher": PALETTE[1], "baseline": "#9e9e9e"}
METRIC_NAMES = {"roc_auc": "ROC-AUC", "macro_f1": "macro F1"}


def _epsilon_chart(privacy: dict[str, Any]) -> str:
    rows = []
    for site in privacy["sites"]:
        epsilon = site["epsilon"]
        if not site["sent_updates"]:
            text = "sent nothing"
        elif epsilon == "inf":
            text = "no DP (inf)"
        else:
            text = fmt(epsilon) + (" VOID" if site["guarantee_void"] else "") + (
                " over cap" if site["within_cap"] is False else "")
        rows.append({"label": site["site"], "value": epsilon if site["sent_updates"] else None, "text": text,
                     "marker": site["cap"], "colour": REFERENCE_COLOURS[1] if site["within_cap"] is False
                     or site["guarantee_void"] else PALETTE[0]})
    return bar_chart("Epsilon spent per site, against its cap", rows, "epsilon (at each site's delta)", "cap")


def _utility_chart(utility: dict[str, Any] | str) -> str:
    if isinstance(utility, str):
        return f'<p class="statement"><b>Utility:</b> {fmt(utility)}</p>'
    metric = METRIC_NAMES.get(utility["metric"], _label(utility["metric"])) + (
        " (lower is better)" if utility["lower_is_better"] else "")
    rows = [{"label": model["model"] if len(model["model"]) <= 26 else model["model"][:25] + "\u2026",
             "value": model["value"], "colour": ROLE_COLOURS[model["role"]]} for model in utility["models"]]
    return bar_chart(f"Student against teacher and baselines: {metric}", rows,
                     f"{metric}, pooled test splits (section {utility['section']})")


def _open_items(items: dict[str, Any]) -> str:
    out = []
    fields = items["not_assessed"]
    if fields["count"]:
        groups = []
        for group in fields["by_section"]:
            # The same field at every site reads once, with how many: "mu_gdp x3".
            leaves: dict[str, int] = {}
            for pointer in group["fields"]:
                leaf = pointer.rsplit("/", 1)[-1]
                leaves[leaf] = leaves.get(leaf, 0) + 1
            names = ", ".join(_label(leaf) + (f" &times;{n}" if n > 1 else "") for leaf, n in leaves.items())
            groups.append(f'<li>&sect;{group["section"]} {_e(group["title"])} ({group["count"]}): '
                          f'<span class="fields">{names}</span></li>')
        out.append(f"<li><b>{fields['count']} field(s) {fmt(NOT_ASSESSED)}</b>, by section:<ul>{''.join(groups)}"
                   "</ul></li>")
    for bound in items["vacuous_bounds"]:
        out.append(f"<li><b>Vacuous bound at {_e(bound['site'])}</b>: {_e(bound['bound'])}, {_e(bound['why'])} "
                   f"(<code>{_e(bound['where'])}</code>)</li>")
    for refusal in items["refusals"]:
        out.append(f"<li><b>{_e(refusal['site'])} refused round(s) {fmt(refusal['rounds'])}</b>: "
                   f"{_e('; '.join(refusal['reasons']))}</li>")
    crosswalk = items["crosswalk"]
    if crosswalk["not_met"]:
        out.append(f"<li><b>Clauses not met</b> (&sect;{crosswalk['section']}): {_e(', '.join(crosswalk['not_met']))}"
                   "</li>")
    if crosswalk["not_assessed"]:
        out.append(f"<li><b>{len(crosswalk['not_assessed'])} clause(s) {fmt(NOT_ASSESSED)}</b> "
                   f"(&sect;{crosswalk['section']}): <span class=\"fields\">{_e(', '.join(crosswalk['not_assessed']))}"
                   "</span></li>")
    return f"<h3>Open items that need a human ({items['count']})</h3>" + (f"<ul>{''.join(out)}</ul>" if out
                                                                           else "<p>none</p>")


def _summary(section: dict[str, Any], report: dict[str, Any]) -> str:
    verdict, privacy, left = section["verdict"], section["privacy"], section["left_each_site"]
    units = " or ".join(privacy["unit_of_privacy"]) or "none (no site sent an update)"
    sites = "".join(f"<li><b>{_e(site['site'])}</b>: {_e(site['line'])}</li>" for site in left["sites"])
    status = verdict["status"]
    return (f'<p class="banner {VERDICT_CLASS.get(status, "bad")}">{VERDICT_TEXT.get(status, "Verification FAILED")}: '
            f'{_e(verdict["detail"])} (section {verdict["section"]})</p>'
            f"<p><b>Unit of privacy:</b> {_e(units)}. <b>Regimes:</b> {_e(section['regimes']['statement'])}.</p>"
            f'<div class="charts"><div>{_epsilon_chart(privacy)}</div><div>{_utility_chart(section["utility"])}'
            "</div></div>"
            f"<h3>What left each site (section {left['section']})</h3><ul>{sites}</ul>"
            f'<p class="meta">Never left any site: {_e("; ".join(left["never_left"]))}.</p>'
            + _open_items(section["open_items"]))


def _envelope(section: dict[str, Any], report: dict[str, Any]) -> str:
    return (kv_table(section, ["report_id", "generated_at", "generator", "tsa_token", "dsse_envelope"])
            + "<h3>Subjects (SHA-256 of every file the report rests on)</h3>"
            + table(section["subjects"], ["name", "path", "sha256"])
            + "<h3>Signatures: ledger heads and checkpoint keys</h3>"
            + table([{**s, "last_checkpoint": (s["last_checkpoint"] or {}).get("signature")}
                     for s in section["signatures"]],
                    ["signer", "signer_role", "algorithm", "key_fingerprint", "head_seq", "head_hash", "checkpoints",
                     "last_checkpoint"]))


def _data_inventory(section: dict[str, Any], report: dict[str, Any]) -> str:
    out = []
    for site, entry in section["sites"].items():
        if is_not_assessed(entry["splits"]):  # a deployed site keeps its records and their counts
            out.append(f"<h3>{_e(site)}</h3>" + kv_table(entry, [k for k in entry if k != "schema"]))
            continue
        # A causal-LM split counts its tokens and has no classes.
        splits = [{"split": name, "records": split["records"], "persons": split["persons"],
                   **({"tokens": split["tokens"]} if "tokens" in split else {}),
                   **{f"class {label}": count for label, count in split.get("class_counts", {}).items()}}
                  for name, split in entry["splits"].items()]
        out.append(f"<h3>{_e(site)}</h3>" + table(splits)
                   + kv_table(entry, [k for k in entry if k not in ("splits", "schema")]))
    # Sites of one federation usually share a schema: each distinct one is shown once, under its digest.
    schemas = {e["schema_digest"]: e["schema"] for e in section["sites"].values() if "schema" in e}
    out.extend(f"<h3>Schema {_e(digest[:16])}&hellip;</h3>" + kv_table(schema) for digest, schema in schemas.items())
    return "".join(out) + "<h3>Provenance</h3>" + kv_table(section, ["provenance", "never_in_report"])


def _wire_bytes(wire: dict[str, Any] | str | None) -> str:
    """A site's bytes on the wire (its transfer events): per stage, and per round with each stage's in and out."""
    if wire is None:
        return ""
    if isinstance(wire, str):
        return f"<p>Bytes on the wire: {_e(wire)}.</p>"
    stages = [row["stage"] for row in wire["per_stage"]]
    rows = []
    for summary in wire["per_round"]:
        row: dict[str, Any] = {"round": summary["round"]}
        for cell in (c for c in wire["per_round_stage"] if c["round"] == summary["round"]):
            row[f"{cell['stage']} in"], row[f"{cell['stage']} out"] = cell["bytes_in"], cell["bytes_out"]
        rows.append({**row, "total in": summary["bytes_in"], "total out": summary["bytes_out"],
                     "payload bytes": summary["payload_bytes"]})
    columns = ["round", *(f"{stage} {d}" for stage in stages for d in ("in", "out")), "total in", "total out",
               "payload bytes"]
    notes = "".join(f"; {fmt(wire[key])} {label}" for key, label in (("errors", "error reply(ies)"),
                                                                       ("unmeasured", "size(s) not measured"))
                    if wire[key])
    return (f"<p>Bytes on the wire: {fmt(wire['total_bytes_in'])} in, {fmt(wire['total_bytes_out'])} out, of which "
            f"{fmt(wire['total_payload_bytes'])} payload (update-sent){notes}.</p>"
            + table(wire["per_stage"], ["stage", "messages", "bytes_in", "bytes_out", "errors"])
            + table(rows, columns))


def _data_flows(section: dict[str, Any], report: dict[str, Any]) -> str:
    knowledge = section.get("knowledge")
    out = [kv_table(section, ["recipient", "came_back", "never_leaves", "clear_metadata", "wire_bytes_counted",
                              "necessity_rationale"]),
           ("<h3>Knowledge releases (soft labels on the proxy set)</h3>"
            + kv_table(knowledge, ["mode", "source", "proxy_digest", "proxy_records", "classes", "what_travels"])
            + table(knowledge["releases"], ["site", "round", "source", "student", "shape", "temperature", "digest",
                                            "why_private"])) if knowledge else "",
           stacked_bars("Bytes sent per round, by site", section["rounds"], section["bytes_per_round"], "round",
                        "bytes")]
    wire = section.get("wire_bytes_per_round") or {}
    if wire.get("out"):
        out += [stacked_bars("Bytes on the wire per round, by site: sent (every stage)", section["rounds"], wire["out"],
                             "round", "bytes"),
                stacked_bars("Bytes on the wire per round, by site: received (every stage)", section["rounds"],
                             wire["in"], "round", "bytes")]
    for site, flows in section["sites"].items():
        out.append(f"<h3>{_e(site)}: what left the site (from {_e(flows['ledger'])})</h3>")
        if flows["ledger_error"]:
            out.append(f'<p class="banner bad">{_e(flows["ledger_error"])}</p>')
        out.append(f"<p>{len(flows['updates'])} update(s), {fmt(flows['total_bytes'])} bytes in all; "
                   f"{len(flows['refusals'])} refusal(s).</p>")
        if flows["tensor_layout"]:
            out.append("<p>Tensor layout of every update:</p>"
                       + table(flows["tensor_layout"], ["name", "shape", "dtype"]))
        out.append(table(flows["updates"], ["round", "seq", "time", "payload_kind", "bytes", "digest"]))
        if flows["refusals"]:
            out.append(table(flows["refusals"]))
        out.append(_wire_bytes(flows.get("wire")))
    if "teacher_cache" in section:
        out.append("<h3>The teacher's top-k cache: it stays at each site</h3>"
                   + _teacher_cache(section["teacher_cache"]))
    return "".join(out)


def _teacher_cache(cache: dict[str, Any] | str) -> str:
    """A causal-LM run's per-site cache (size, digest, its ledger event) beside what left the site per round."""
    if isinstance(cache, str):
        return f"<p>{fmt(cache)}</p>"
    rows = [{"site": site, "positions": c["positions"], "cache bytes": c["bytes"],
             "teacher forward passes": c["teacher_forward_passes"], "cache digest": c["digest"],
             "ledger event": (c["ledger_event"] if is_not_assessed(c["ledger_event"]) else
                              f"seq {c['ledger_event']['seq']}, sent: {fmt(c['ledger_event']['sent'])}"),
             "bytes sent per round (median)": c["sent_per_round_bytes"],
             "tensors sent per round": c["sent_per_round_tensors"],
             "update bytes per round in the ledger (median)": c["update_bytes_median_in_ledger"],
             **({"teacher continuations (bytes, digest)": f"{c['continuations']['bytes']} B, "
                                                          f"{c['continuations']['digest']}"}
                if "continuations" in c else {})}
            for site, c in cache["sites"].items()]
    return f"<p>{_e(cache['stays_at_site'])} (from {_e(cache['source'])}).</p>" + table(rows)


def _privacy(section: dict[str, Any], report: dict[str, Any]) -> str:
    sites = section["sites"]
    caps = {f"cap {b['budget']['cap_per_run']:g}": b["budget"]["cap_per_run"] for b in sites.values()
            if b["budget"]["cap_per_run"] is not None}
    federation = section["federation"]
    void = federation["guarantee_void_at"]
    out = [f'<p class="banner bad">Record-level DP guarantee VOID at {_e(", ".join(void))}: a teacher trained on the '
           "site's own records without DP (below).</p>" if void else "",
           line_chart("Epsilon spent per site, per round (cumulative, at each site's delta)",
                      {site: [(p["round"], p["epsilon"]) for p in b["epsilon_per_round"]
                              if isinstance(p["epsilon"], (int, float))] for site, b in sites.items()},
                      "round", "epsilon", caps),
           "<h3>Federation summary</h3>", f'<p class="statement">{_e(federation["statement"])}</p>',
           kv_table(federation, ["sites_that_sent_updates", "max_epsilon", "median_epsilon", "warning",
                                 "guarantee_void_at"]),
           "<h3>Unprotected quantities (not covered by any epsilon)</h3><ul>"
           + "".join(f"<li>{_e(item)}</li>" for item in section["unprotected_quantities"]) + "</ul>"]
    for site, block in sites.items():
        out.append(f"<h3>Site {_e(site)}</h3>")
        if block["teacher"]["guarantee_void"]:
            out.append(f'<p class="banner bad">Record-level DP guarantee VOID at site {_e(site)}: its teacher was '
                       "trained on its private records without DP (teacher, below).</p>")
        out.append(f'<p class="statement">{_e(block["statement"])}</p>')
        out.append(kv_table(block, ["unit_of_privacy", "neighbouring_relation", "setting", "contribution_bound",
                                    "teacher", "mechanism", "accountant", "delta", "delta_rationale", "epsilon_total",
                                    "epsilon_recorded", "epsilon_replayed_pld", "epsilon_lifetime",
                                    "privacy_profile", "mu_gdp", "budget", "released_outputs"]))
    recorded = {site: {p["round"]: p["epsilon"] for p in b["epsilon_per_round"]} for site, b in sites.items()}
    rounds = sorted({r for per_site in recorded.values() for r in per_site})
    out.append("<h3>Epsilon per round, as each site's ledger recorded it (cumulative, at the site's delta)</h3>"
               + table([{"round": r, **{site: per_site.get(r) for site, per_site in recorded.items()}}
                        for r in rounds]))
    return "".join(out)


def _secure_aggregation(section: dict[str, Any], report: dict[str, Any]) -> str:
    rows = [{**r, "participants": len(r["participants"]),
             "failures": ", ".join(f"{k}: {v}" for k, v in r["failures"].items()) or None,
             "refusals": ", ".join(r["refusals"]) or None,
             "rejected": ", ".join(f"{k}: {v}" for k, v in r.get("rejected", {}).items()) or None}
            for r in section["per_round"]]
    return (kv_table(section, ["enabled", "protocol", "parameters", "clipped_values", "transport", "caveat"])
            + "<h3>Per round</h3>"
            + table(rows, ["round", "status", "aggregation", "participants", "min_cohort_met", "failures",
                           "refusals", "rejected", "aggregate_rejected", "reason", "quantization_error_bound"]))


def _audit_trail(section: dict[str, Any], report: dict[str, Any]) -> str:
    verification = section["verification"]
    verdict = ('<p class="banner ok">fedistill verify: verified</p>' if verification["verified"] else
               f'<p class="banner bad">fedistill verify FAILED: {_e(verification["failure"])}</p>')
    ledgers = [{**ledger, "kinds": ", ".join(f"{k} {v}" for k, v in ledger["kinds"].items())}
               for ledger in section["ledgers"]]
    return (verdict + kv_table(section, ["scheme", "cross_recorded_site_heads", "clock_source", "retention",
                                         "tsa_tokens", "limits"])
            # Head hashes are in the appendix, with the other digests.
            + "<h3>Ledgers</h3>" + table(ledgers, ["actor", "path", "events", "first_seq", "last_seq", "checkpoints",
                                                   "kinds", "first_time", "last_time", "error"])
            + "<h3>Coordinator checkpoints</h3>" + table(section["coordinator_checkpoints"]))


def _evaluation(section: dict[str, Any], report: dict[str, Any]) -> str:
    if is_not_assessed(section["overall"]):
        # No utility to plot (a deployed run): say why instead of drawing an empty chart.
        return (f'<p class="statement">{fmt(section["overall"])}</p>'
                + kv_table(section, ["headline_metric", "confidence_intervals", "empirical_privacy_audit"])
                + "<h3>Per round: the training loss the sites reported</h3>"
                + table(section["per_round"], ["round", "status", "train_loss"]))
    metric, metrics = section["headline_metric"], section["metrics"]
    columns = ["model", *metrics]
    # A causal-LM test split is counted in tokens, per site and model.
    site_columns = [*columns, "tokens"] if report["run"]["task"] == CAUSAL_LM else columns
    per_round = [(r["round"], r[metric]) for r in section["per_round"] if r.get(metric) is not None]
    references = ({} if is_not_assessed(section["baselines_reference"]) else
                  {_label(k): v for k, v in section["baselines_reference"].items() if v is not None})
    axis = _label(metric) + (" (lower is better)" if metric in section["lower_is_better"] else "")
    out = [kv_table(section, ["headline_metric", "data", *(["lower_is_better"] if section["lower_is_better"] else [])]),
           line_chart(f"Federated student {_label(metric)} per round (pooled test splits)",
                      {"federated student": per_round}, "round", axis, references, from_zero=False) if per_round else
           f"<p>No round of metrics.jsonl records the federated student's {_e(_label(metric))}.</p>",
           "<h3>All sites (pooled test splits)</h3>", table(section["overall"], columns),
           kv_table(section, ["comparison", "confidence_intervals", "empirical_privacy_audit"])]
    for site, rows in section["per_site"].items():
        out.append(f"<h3>Site {_e(site)} (its own test split)</h3>" + table(rows, site_columns))
    out.append("<h3>Per round</h3>" + table(section["per_round"], ["round", "status", *metrics, "train_loss"]))
    out.append(_site_evaluation(section.get("site_evaluation"), metrics))
    return "".join(out)


def _site_evaluation(evaluated: dict[str, Any] | str | None, metrics: list[str]) -> str:
    """The sites' own released test evaluations: how each released, and the figures computed from the release."""
    if evaluated is None:
        return ""
    if is_not_assessed(evaluated):
        return f"<h3>The sites' own test evaluation</h3><p>{fmt(evaluated)}</p>"
    out = ["<h3>The sites' own test evaluation</h3>", f'<p class="statement">{_e(evaluated["method"])}</p>']
    for evaluation in evaluated["evaluations"]:
        rows = [{"site": "pooled (sum of the released histograms)", "released": ", ".join(evaluated["releases"]),
                 "noise_std": evaluation["pooled"]["noise_std_per_cell"], **evaluation["pooled"]}]
        rows += [{"site": site, **release} for site, release in evaluation["sites"].items()]
        out.append(f"<h4>After round {evaluation['after_round']}</h4>"
                   + table(rows, ["site", "released", "noise_std", *metrics, "n"]))
        if evaluation["pooled"].get("noise_interval_90"):
            out.append(kv_table({"noise_interval_90": evaluation["pooled"]["noise_interval_90"]}))
    return "".join(out)


def _model_card(section: dict[str, Any], report: dict[str, Any]) -> str:
    """The card as key and value; a causal-LM run's settings beside a table of its per-site caches and sends."""
    out = [kv_table(section, [key for key in section if key != "causal_lm"])]
    causal = section.get("causal_lm")
    if causal is not None:
        sent = causal["sent_per_round"]
        rows = [{"site": site, "cache positions": cache["positions"], "cache bytes": cache["bytes"],
                 "teacher forward passes": cache["teacher_forward_passes"], "cache digest": cache["digest"],
                 "bytes sent per round": sent.get(site, {}).get("bytes"),
                 "tensors sent per round": sent.get(site, {}).get("tensors"),
                 "rounds that sent": sent.get(site, {}).get("rounds")}
                for site, cache in causal["cache"].items()]
        settings = [key for key in causal if key not in ("cache", "sent_per_round")]
        out += ["<h3>Causal-LM distillation</h3>", kv_table(causal, settings),
                "<h3>Per site: the top-k cache (kept at the site) and what left it per round (median)</h3>",
                table(rows)]
    return "".join(out)


def _crosswalk(section: dict[str, Any], report: dict[str, Any]) -> str:
    def cell(column: str, value: Any) -> str:
        if column == "status":
            return badge(value)
        if column == "sections":
            return ", ".join(f"&sect;{n}" for n in value)
        if column == "evidence":
            # The files' digests are in the appendix (section 0's subjects), not repeated per row.
            files = "".join(f"<div><code>{_e(f['path'])}</code></div>" for f in value["files"])
            pointers = "".join(f"<div><code>report.json{_e(p)}</code></div>" for p in value["report"])
            return (pointers + files) or "none"
        return fmt(value)

    rows = (table(section["rows"], ["regime", "clause", "requirement", "sections", "evidence", "status", "basis"], cell)
            if section["rows"] else "")
    return f'<p class="statement">{_e(section["declaration"])}</p><p>{_e(section["note"])}</p>' + rows


def _verification(section: dict[str, Any], report: dict[str, Any]) -> str:
    def cell(column: str, value: Any) -> str:
        return badge(value) if column == "result" else fmt(value)

    return (kv_table(section, ["tool", "verified"])
            + "<h3>Commands an auditor runs</h3><pre>" + "\n".join(_e(c) for c in section["commands"]) + "</pre>"
            + "<h3>Checks by fedistill verify</h3>" + table(section["checks"], cell=cell)
            + "<h3>Checks by the report generator</h3>"
            + table(section["report_checks"], ["check", "result"], cell)
            + "<h3>Claims not machine-checked</h3><ul>"
            + "".join(f"<li>{_e(item)}</li>" for item in section["not_machine_checked"]) + "</ul>")


RENDERERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]] = {
    "summary": _summary, "envelope": _envelope, "data_inventory": _data_inventory, "data_flows": _data_flows, "privacy": _privacy,
    "secure_aggregation": _secure_aggregation, "audit_trail": _audit_trail, "model_card": _model_card,
    "evaluation": _evaluation, "crosswalk": _crosswalk, "verification": _verification,
}


def heading(entry: dict[str, Any]) -> str:
    """A section's heading as the HTML and PDF show it (tests look for it in the PDF text)."""
    return f"{entry['number']}. {entry['title']}"


def render_html(report: dict[str, Any]) -> str:
    run = report["run"]
    toc = "".join(f'<li><a href="#{_e(s["key"])}">{_e(heading(s))}</a></li>' for s in report["sections"])
    body = [f"<h1>Compliance report: run {_e(run['run_id'])}</h1>",
            f'<p class="meta">generated {_e(report["envelope"]["generated_at"])} &middot; schema version '
            f"{report['schema_version']} &middot; {_e(run['description'] or run['mode'])} &middot; every figure is "
            f"read from report.json; fields the run cannot evidence say {fmt(NOT_ASSESSED)}. Not legal advice.</p>"]
    for entry in report["sections"]:
        section = report[entry["key"]]
        render = RENDERERS.get(entry["key"], lambda s, r: kv_table(s))
        body.append(f'<section id="{_e(entry["key"])}"><h2>{_e(heading(entry))}</h2>{render(section, report)}'
                    "</section>")
        if entry["key"] == "summary":
            # The summary is the first screen; the table of contents follows it.
            body.append(f'<nav><p class="meta">report {_e(report["envelope"]["report_id"])}</p><ul>{toc}</ul></nav>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fedistill report '
            f"{_e(run['run_id'])}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


# ------------------------------------------------------------------------------------------------ chromium
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise ExternalToolError("a PDF report needs headless Chromium, and 'chromium' is not on PATH. Install "
                                "Debian's chromium package (apt-get install chromium), or ask for --format "
                                "html,json.")
    return path


def run_chromium(args: Sequence[str], page: Path, timeout: float = CHROMIUM_TIMEOUT_S) -> str:
    """Headless Chromium on a local page, with a fresh profile and no background network traffic; returns what
    it wrote to stdout (the page's DOM, with ``--dump-dom``)."""
    with tempfile.TemporaryDirectory(prefix="fedistill-chromium-") as profile:
        command = [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, Path(page).resolve().as_uri()]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ExternalToolError(f"headless Chromium did not finish within {timeout:.0f} s on {page}.") from None
    if result.returncode != 0:
        raise ExternalToolError(f"headless Chromium failed on {page} (exit status {result.returncode}): "
                                f"{result.stderr.strip()[-800:]}")
    return result.stdout


def print_pdf(html_text: str, pdf_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fedistill-report-") as work:
        page, pdf = Path(work) / "report.html", Path(work) / "report.pdf"
        page.write_text(html_text, encoding="utf-8")
        run_chromium(["--no-pdf-header-footer", f"--print-to-pdf={pdf}"], page)
        if not pdf.is_file() or pdf.stat().st_size == 0:
            raise ExternalToolError(f"headless Chromium exited without writing {pdf}; run it by hand on {page} to see "
                                    "why.")
        atomic_write_bytes(Path(pdf_path), pdf.read_bytes())


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--format {text!r}: choose one or more of {', '.join(FORMATS)}, separated by commas "
                          "(e.g. --format html,json).")
    return formats


def write_report(run_dir: Path, out_dir: Path | None = None, formats: Sequence[str] = FORMATS,
                 signing_key: Path | None = None) -> dict[str, Path]:
    """Build report.json for ``run_dir`` and write the asked formats into ``out_dir`` (default RUN_DIR/report).

    report.json is signed with the coordinator's ledger key (``signing_key``; a simulated run keeps it in
    RUN_DIR/ledger_key.pem), into a detached report.json.sig. Chromium and the key are looked up before any work,
    so a missing PDF printer or key fails fast and leaves nothing half-written.
    """
    if "pdf" in formats:
        chromium_path()
    key = Path(signing_key) if signing_key is not None else Path(run_dir) / "ledger_key.pem"
    if "json" in formats and not key.is_file():
        raise ConfigError(f"report.json is signed with the coordinator's ledger key, and {key} does not exist; pass "
                          "--signing-key with the coordinator's key (in a deployment: coordinator_key.pem in the "
                          "coordinator directory).")
    report = build_report(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    written: dict[str, Path] = {}
    if "json" in formats:
        written["json"] = out / "report.json"
        # In the outline's order (not sorted): report.json is read by people too.
        atomic_write_bytes(written["json"], (json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False)
                                             + "\n").encode("utf-8"))
        written["signature"] = sign_report(written["json"], key)
    page = render_html(report)
    if "html" in formats:
        written["html"] = out / "report.html"
        atomic_write_bytes(written["html"], page.encode("utf-8"))
    if "pdf" in formats:
        written["pdf"] = out / "report.pdf"
        print_pdf(page, written["pdf"])
    return written
