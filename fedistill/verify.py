"""``fedistill verify RUN_DIR``: re-derive every checkable number of a run from its signed ledgers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from fedistill.console import print_error
from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError


def verify_command(
    run_dir: Path = typer.Argument(..., help="A run directory (runs/<run-id>) with its ledgers and site directories."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Verify a run: config hash, every ledger chain and signature, cross-recorded heads, replayed epsilons."""
    from compliance.verify import verify_run

    try:
        report = verify_run(run_dir)
    except FedistillError as err:
        if output_format is OutputFormat.json:
            sys.stdout.write(json.dumps({"schema_version": 1, "verified": False, "run_dir": str(run_dir),
                                         "failure": str(err)}, indent=2) + "\n")
        print_error(err, "verification failed")
        raise typer.Exit(code=1) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return
    console = Console()
    for check in report.checks:
        console.print(f"[green]ok[/green] {check}")
    for site, details in report.sites.items():
        epsilon = details.get("epsilon_recorded")
        text = "no update sent" if epsilon is None else (
            f"epsilon {epsilon} recorded, {details['epsilon_replayed']} replayed" if isinstance(epsilon, str) else
            f"epsilon {epsilon:.4f} recorded, {details['epsilon_replayed']:.4f} replayed at delta {details['delta']:g}")
        console.print(f"   {site}: {details['updates_sent']} update(s) sent, {details['refusals']} refusal(s); {text}")
    console.print(f"[bold green]verified[/bold green] {report.run_dir}")
