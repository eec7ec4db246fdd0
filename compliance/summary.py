"""Section 1 of a report, the executive summary: what a privacy officer reads first, on one screen.

Derived from the other sections of report.json only (:func:`summary_of`), so a verifier recomputes it from the
report and compares; nothing here reads the run directory. It holds:

- the verdict: verified, incomplete or failed (section 15, with the report generator's own checks);
- the unit of privacy, and each site's epsilon against its cap (section 6);
- the student's headline metric against the teacher and the baselines (section 11), or why it is not assessed;
- what left each site, one line per site (section 5);
- the open items that need a human: every "not assessed" field, grouped by section, counted and located by JSON
  pointer; vacuous bounds (a group-privacy bound whose delta reaches 1, no DP, a guarantee its teacher voids);
  refused rounds; crosswalk clauses not met or not assessed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from compliance.assessed import NOT_ASSESSED, is_not_assessed, not_assessed

STUDENT, TEACHER = "federated student", "teacher"
# Sections whose "not assessed" values are not fields: the crosswalk's statuses (counted as clauses instead) and
# the summary itself.
NOT_FIELD_SECTIONS = ("summary", "crosswalk")


def _pointer(parts: tuple[str, ...]) -> str:
    """A JSON pointer (RFC 6901) into report.json."""
    return "#/" + "/".join(str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _not_assessed_paths(value: Any, parts: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    if is_not_assessed(value):
        yield parts
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _not_assessed_paths(item, (*parts, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _not_assessed_paths(item, (*parts, str(index)))


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    verification = report["verification"]
    failed = [check["check"] for check in verification["report_checks"] if check["result"] == "failed"]
    status = verification["status"]
    if status == "verified" and failed:
        status = "failed"
    if status == "verified":
        detail = ("fedistill verify: every ledger chain and signature, the cross-recorded heads and every site's "
                  "replayed epsilon check out, and so do the report generator's own checks")
    elif status == "incomplete":
        detail = "; ".join(check.get("detail", check["check"]) for check in verification["checks"]
                           if check["result"] == "incomplete")
    else:
        detail = "; ".join([check.get("detail", check["check"]) for check in verification["checks"]
                            if check["result"] == "failed"] + failed)
    return {"status": status, "detail": detail, "section": _number(report, "verification")}


def _number(report: dict[str, Any], key: str) -> int:
    return next(entry["number"] for entry in report["sections"] if entry["key"] == key)


def _privacy(report: dict[str, Any]) -> dict[str, Any]:
    privacy = report["privacy"]
    sites = [{"site": name, "epsilon": block["epsilon_total"], "delta": block["delta"],
              "cap": block["budget"]["cap_per_run"], "within_cap": block["budget"]["within_cap"],
              "sent_updates": bool(block["rounds_joined"]), "guarantee_void": block["teacher"]["guarantee_void"]}
             for name, block in privacy["sites"].items()]
    return {"unit_of_privacy": sorted({block["unit_of_privacy"] for block in privacy["sites"].values()}),
            "target_epsilon": privacy["target_epsilon"], "sites": sites,
            "statement": privacy["federation"]["statement"], "warning": privacy["federation"]["warning"],
            "section": _number(report, "privacy")}


def _role(model: str) -> str:
    # "federated student", or a deployed run's "federated student, as the sites evaluated it".
    return "student" if model.startswith(STUDENT) else "teacher" if model == TEACHER else "baseline"


def _utility(report: dict[str, Any]) -> dict[str, Any] | str:
    evaluation = report["evaluation"]
    overall, metric = evaluation["overall"], evaluation.get("headline_metric")
    if is_not_assessed(overall):
        return overall
    if not isinstance(metric, str) or is_not_assessed(metric):
        return not_assessed("the evaluation names no headline metric")
    return {"metric": metric, "lower_is_better": metric in evaluation.get("lower_is_better", []),
            "data": evaluation.get("data"),
            "models": [{"model": row["model"], "value": row.get(metric), "role": _role(row["model"])}
                       for row in overall],
            "section": _number(report, "evaluation")}


def _left_site(flows: dict[str, Any], recipient: str, knowledge: bool) -> str:
    updates, layout, wire = flows["updates"], flows["tensor_layout"], flows.get("wire")
    if flows["ledger_error"]:
        return f"not known: its ledger could not be read ({flows['ledger_error']})"
    if not updates:
        line = "no update"
    else:
        dtypes = sorted({tensor["dtype"] for tensor in layout}) if layout else []
        line = (f"{len(updates)} update(s), {flows['total_bytes']:,} B of payload"
                + (f" ({len(layout)} tensor(s), {', '.join(dtypes)})" if layout else "")
                + (", with soft labels on the public proxy set" if knowledge else "") + f", to {recipient}")
    evaluations = [e for e in flows.get("test_evaluations", []) if e["released"] != "none"]
    if evaluations:
        kinds = sorted({e["released"] for e in evaluations})
        line += (f"; {len(evaluations)} test-evaluation histogram(s) of the student ({', '.join(kinds)}"
                 + (f", noise std {evaluations[0]['noise_std']:g} per cell" if kinds == ["noised"] else "") + ")")
    if isinstance(wire, dict):
        line += f"; {wire['total_bytes_out']:,} B sent on the wire in all"
    refusals = flows["refusals"]
    return line + (f"; refused round(s) {', '.join(str(r['round']) for r in refusals)}" if refusals else "")


def _left(report: dict[str, Any]) -> dict[str, Any]:
    flows = report["data_flows"]
    return {"sites": [{"site": name, "line": _left_site(site, flows["recipient"], "knowledge" in flows)}
                      for name, site in flows["sites"].items()],
            "never_left": flows["never_leaves"], "section": _number(report, "data_flows")}


def _bounds(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Guarantees that say nothing, or less than they seem to: each needs a human's reading."""
    items = []
    for name, block in report["privacy"]["sites"].items():
        where = ("privacy", "sites", name)
        if block["rounds_joined"] and block["epsilon_total"] == "inf":
            items.append({"site": name, "where": _pointer((*where, "epsilon_total")), "bound": "epsilon inf",
                          "why": "trained without differential privacy: its updates carry no formal guarantee"})
        if block["teacher"]["guarantee_void"]:
            items.append({"site": name, "where": _pointer((*where, "teacher")), "bound": "void",
                          "why": "its teacher was trained on its records without DP, which voids the record-level "
                                 "guarantee"})
        bound = block["contribution_bound"]
        level = bound.get("person_level")
        if isinstance(level, dict) and (level.get("vacuous") or level.get("delta", 0) >= 1):
            items.append({"site": name, "where": _pointer((*where, "contribution_bound", "person_level")),
                          "bound": f"({level['epsilon']:.4g}, {level['delta']:.2g})",
                          "why": f"group privacy for a person with up to {bound['max_records_per_person']} records: "
                                 "its delta reaches 1, so it excludes nothing; the guarantee is for one record only"})
    return items


def _open_items(report: dict[str, Any]) -> dict[str, Any]:
    groups = []
    for entry in report["sections"]:
        if entry["key"] in NOT_FIELD_SECTIONS:
            continue
        paths = list(_not_assessed_paths(report[entry["key"]], (entry["key"],)))
        if paths:
            groups.append({"section": entry["number"], "key": entry["key"], "title": entry["title"],
                           "count": len(paths), "fields": [_pointer(path) for path in paths]})
    refusals = [{"site": name, "where": _pointer(("privacy", "sites", name, "budget", "refusals")),
                 "rounds": [r["round"] for r in block["budget"]["refusals"]],
                 "reasons": sorted({r["reason"] for r in block["budget"]["refusals"]})}
                for name, block in report["privacy"]["sites"].items() if block["budget"]["refusals"]]
    rows = report["crosswalk"]["rows"]
    clauses = {status: [f"{row['regime']} {row['clause']}" for row in rows if row["status"] == status]
               for status in ("not met", NOT_ASSESSED)}
    bounds = _bounds(report)
    fields = sum(group["count"] for group in groups)
    return {"not_assessed": {"count": fields, "by_section": groups},
            "vacuous_bounds": bounds, "refusals": refusals,
            "crosswalk": {"not_met": clauses["not met"], "not_assessed": clauses[NOT_ASSESSED],
                          "section": _number(report, "crosswalk")},
            "count": fields + len(bounds) + len(refusals) + len(clauses["not met"]) + len(clauses[NOT_ASSESSED])}


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """Section 1 of ``report``, from its other sections (``summary`` itself, if present, is ignored)."""
    crosswalk = report["crosswalk"]
    return {"verdict": _verdict(report), "privacy": _privacy(report), "utility": _utility(report),
            "left_each_site": _left(report), "open_items": _open_items(report),
            "regimes": {"declared": crosswalk["regimes_declared"], "statement": crosswalk["declaration"]}}
