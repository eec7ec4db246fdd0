"""``fedistill site ...``: what a site engineer runs at the site."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from fedistill.console import make_console, print_error
from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError

site_app = typer.Typer(help="Commands for a site: set up, check, join the federation, report.", no_args_is_help=True)


@site_app.command("init")
def init_command(
    directory: Path = typer.Argument(..., help="The site's directory (created if missing)."),
    name: str = typer.Option(..., "--name", help="The site's name, as the operator will register it."),
) -> None:
    """Create site.toml (commented, to fill in), the site's node key pair and its ledger signing key."""
    from client.sitefile import NODE_KEY_NAME, write_template
    from protocols.ledger import generate_signing_key
    from protocols.pki import create_node_key, node_key_fingerprint

    try:
        directory.mkdir(parents=True, exist_ok=True)
        site_file = write_template(directory, name)
        public_key = create_node_key(directory / NODE_KEY_NAME)
        state_dir = directory / "state"
        state_dir.mkdir(exist_ok=True)
        generate_signing_key(state_dir / "ledger_key.pem")
    except FedistillError as err:
        print_error(err)
        raise typer.Exit(code=1) from None
    console = make_console()
    console.print(f"wrote {site_file}: fill in every FILL IN, then run [bold]fedistill site check {site_file}[/bold]")
    console.print(f"send this public key to the consortium operator ({public_key}, fingerprint "
                  f"{node_key_fingerprint(public_key)}):")
    typer.echo(public_key.read_text().strip())


@site_app.command("check")
def check_command(
    site_file: Path = typer.Argument(..., help="The site's site.toml."),
    offline: bool = typer.Option(False, "--offline", help="Skip the connection to the coordinator."),
    run_config: Path | None = typer.Option(None, "--run-config", help="The run's config.json (from the operator): "
                                           "compare its student's input width and classes and its "
                                           "preprocessing_digest with this site's."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Check everything before joining: config, data, teacher, budget, keys, certificates, coordinator."""
    from client.check import checks_to_json, run_checks

    _, items = run_checks(site_file, connect=not offline, run_config=run_config)
    result = checks_to_json(site_file, items)
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        # Soft wrap: the details are error messages naming paths, which must stay whole.
        console = make_console(soft_wrap=True)
        marks = {True: "[green]ok[/green]  ", False: "[red]FAIL[/red]", None: "[yellow]skip[/yellow]"}
        for item in items:
            console.print(f"{marks[item.ok]} {item.name}: {escape(item.detail)}", highlight=False)
        console.print("[bold green]ready to join[/bold green]" if result["ok"] else
                      "[bold red]not ready:[/bold red] fix the failed checks above")
    if not result["ok"]:
        raise typer.Exit(code=1)


@site_app.command("start")
def start_command(site_file: Path = typer.Argument(..., help="The site's site.toml.")) -> None:
    """Join the federation: start this site's Flower SuperNode (TLS, node key); stops cleanly on SIGTERM."""
    from client.node import start_site
    from client.sitefile import SiteFile

    try:
        site = SiteFile.load(site_file)
        daemon, log_path = start_site(site)
    except FedistillError as err:
        print_error(err)
        raise typer.Exit(code=1) from None
    make_console().print(f"site {site.name} connects to {site.coordinator_address}; log: {log_path}")
    try:
        code = daemon.wait()
    finally:
        daemon.stop()
    if code:
        from client.node import failure_reason

        print_error(f"{failure_reason(log_path)}\nIf activation failed: is this site's key registered with the "
                    "coordinator (`fedistill site check` asks it; the operator registers it with `fedistill coordinator "
                    "add-site`)? A site stopped uncleanly is released after about a minute; then start it again. "
                    f"Log: {log_path}", heading=f"the SuperNode exited with code {code}")
        raise typer.Exit(code=1)


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
        print_error(err)
        raise typer.Exit(code=1) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    console = make_console()
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


@site_app.command("evidence")
def evidence_command(
    state_dir: Path = typer.Argument(..., help="The site's state directory."),
    out: Path = typer.Argument(..., help="Where to copy the evidence (e.g. RUN_DIR/sites/<site> for the auditor)."),
) -> None:
    """Copy what an auditor needs to verify runs (ledger, its public key, spends, policy) — never the records."""
    from client.report import export_evidence

    try:
        copied = export_evidence(state_dir, out)
    except FedistillError as err:
        print_error(err)
        raise typer.Exit(code=1) from None
    make_console().print(f"copied {', '.join(p.name for p in copied)} to {out}")
