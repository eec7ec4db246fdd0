"""``fedistill report RUN_DIR``: the run's compliance report as report.json, a self-contained HTML page and a PDF."""

from __future__ import annotations

from pathlib import Path

import typer

from fedistill.console import print_error
from protocols.errors import FedistillError

ALL_FORMATS = "html,pdf,json"


def report_command(
    run_dir: Path = typer.Argument(..., help="A run directory: runs/<run-id> of fedistill simulate, or a "
                                             "deployment's with every site's evidence (docs/deploy.md)."),
    formats: str = typer.Option(ALL_FORMATS, "--format", help="Comma-separated: html, pdf, json."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the report (default: RUN_DIR/report)."),
    signing_key: Path | None = typer.Option(None, "--signing-key", help="The coordinator's ledger key, which signs "
                                                                        "report.json (default: RUN_DIR/ledger_key.pem)."),
) -> None:
    """Write the compliance report of a run: what left each site, privacy spent, audit trail, crosswalk."""
    write_and_print(run_dir, out, formats, signing_key=signing_key)


def write_and_print(run_dir: Path, out: Path | None = None, formats: str = ALL_FORMATS,
                    to_stderr: bool = False, signing_key: Path | None = None) -> None:
    """Write the report, then one unwrapped line per file, so the path can be copied from any terminal or log."""
    from compliance.render import parse_formats, write_report

    try:
        written = write_report(run_dir, out, parse_formats(formats), signing_key)
    except FedistillError as err:
        print_error(err)
        raise typer.Exit(code=1) from None
    for kind, path in written.items():
        typer.echo(f"report ({kind}): {path}", err=to_stderr)
