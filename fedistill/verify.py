"""``fedistill verify RUN_DIR``: re-derive every checkable number of a run from its signed ledgers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from fedistill.console import make_console, print_error
from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError

INCOMPLETE_EXIT = 2


def verify_command(
    run_dir: Path | None = typer.Argument(None, help="A run directory (runs/<run-id>) with its ledgers and site "
                                                     "directories."),
    report_file: Path | None = typer.Option(None, "--report", help="Check a report.json handed over on its own "
                                                                   "(report.json.sig beside it) instead of a run."),
    fingerprint: str | None = typer.Option(None, "--key-fingerprint", help="With --report: the coordinator key's "
                                                                           "fingerprint, as the operator reads it out."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Verify a run (config hash, ledgers, anchors, rounds, student, replayed epsilons, its report), or one report.

    Exit status: 0 verified, 1 failed, 2 incomplete (no signed run-finished event).
    """
    from compliance.report_signature import verify_report
    from compliance.verify import verify_run

    if (run_dir is None) == (report_file is None):
        print_error("give either a RUN_DIR or --report report.json, not both and not neither.")
        raise typer.Exit(code=1)
    subject = str(run_dir or report_file)
    try:
        if report_file is not None:
            checked = verify_report(report_file, fingerprint)
            result = {"schema_version": 1, "verified": True, "status": "verified", "report": str(report_file),
                      "report_id": checked["report_id"], "key_fingerprint": checked["key_fingerprint"]}
        else:
            result = verify_run(run_dir).to_dict()
    except FedistillError as err:
        if output_format is OutputFormat.json:
            sys.stdout.write(json.dumps({"schema_version": 1, "verified": False, "status": "failed",
                                         "run_dir": subject, "failure": str(err)}, indent=2) + "\n")
        print_error(err, "verification failed")
        raise typer.Exit(code=1) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        _render(result)
    if result["status"] != "verified":
        raise typer.Exit(code=INCOMPLETE_EXIT)


def _render(result: dict) -> None:
    console = make_console()
    if "report_id" in result:
        console.print(f"[bold green]verified[/bold green] {result['report']}: report_id {result['report_id']}, signed "
                      f"by {result['key_fingerprint']} (compare it with the coordinator's key)")
        return
    for check in result["checks"]:
        console.print(f"[green]ok[/green] {escape(check)}")
    for site, details in result["sites"].items():
        epsilon = details.get("epsilon_recorded")
        text = "no update sent" if epsilon is None else (
            f"epsilon {epsilon} recorded, {details['epsilon_replayed']} replayed" if isinstance(epsilon, str) else
            f"epsilon {epsilon:.4f} recorded, {details['epsilon_replayed']:.4f} replayed at delta {details['delta']:g}")
        console.print(f"   {escape(site)}: {details['updates_sent']} update(s) sent, {details['refusals']} "
                      f"refusal(s); {text}")
    for reason in result["incomplete"]:
        console.print(f"[yellow]incomplete[/yellow] {escape(reason)}")
    word = "[bold green]verified[/bold green]" if result["status"] == "verified" else "[bold yellow]incomplete[/bold yellow]"
    console.print(f"{word} {escape(result['run_dir'])}")
