"""``fedistill site ...``: what a site engineer runs at the site."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError

site_app = typer.Typer(help="Commands for a site: its own report.", no_args_is_help=True)


@site_app.command("report")
def report_command(
    state_dir: Path = typer.Argument(..., help="The site's state directory."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Everything that left this site, the epsilon it spent and the budget it has left (from its own ledger)."""
    from client.report import site_report

    try:
        report = site_report(state_dir)
    except FedistillError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    console = Console()
    console.print(f"site {report['site']}: unit of privacy {report['unit_of_privacy']}; ledger verified "
                  f"({report['ledger']['events']} events, {report['ledger']['checkpoints']} signed checkpoints)")
    table = Table(title="what left this site")
    for column in ("run", "round", "payload", "tensors", "bytes", "digest"):
        table.add_column(column)
    for run_id, run in report["runs"].items():
        for sent in run["updates_sent"]:
            table.add_row(run_id, str(sent["round"]), sent["payload_kind"], str(sent["tensors"]),
                          f"{sent['bytes']:,}", sent["digest"][:16])
    console.print(table)
    for run_id, run in report["runs"].items():
        refused = ", ".join(str(r["round"]) for r in run["refusals"]) or "none"
        console.print(f"run {run_id}: epsilon {_fmt(run['epsilon'])} at delta {report['delta']:g}; refused rounds: "
                      f"{refused}")
    left = report["lifetime_budget_left"]
    console.print(f"lifetime epsilon {_fmt(report['epsilon_lifetime'])} ({report['accountant']}); lifetime budget "
                  f"left: {'no lifetime cap' if left is None else _fmt(left)}")


def _fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4f}"
