"""``fedistill coordinator ...``: what the consortium operator runs on the coordinator machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from fedistill.console import make_console, print_error
from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError

coordinator_app = typer.Typer(help="Commands for the consortium operator: certificates, sites, the coordinator.",
                              no_args_is_help=True)


def _fail(err: FedistillError) -> typer.Exit:
    print_error(err)
    return typer.Exit(code=1)


@coordinator_app.command("init")
def init_command(
    directory: Path = typer.Argument(..., help="The coordinator directory to create."),
    host: list[str] = typer.Option(..., "--host", help="A host name or IP the sites dial (repeat for several)."),
    port: int = typer.Option(9092, "--port", help="The port the sites and the Flower CLI connect to."),
    listen: str = typer.Option(None, "--listen", help="Address to listen on (default: --host if it is an IP, "
                                                      "else every interface)."),
    organisation: str = typer.Option("consortium", "--organisation", help="Named in the CA certificate."),
) -> None:
    """Create a CA, a TLS server certificate for --host, the coordinator's signing key and an empty site registry."""
    from coordinator.operator import init_coordinator

    try:
        coordinator = init_coordinator(directory, host, port, listen, organisation)
    except FedistillError as err:
        raise _fail(err) from None
    console = make_console()
    console.print(f"coordinator directory {coordinator.path}: sites dial {coordinator.address}, listening on "
                  f"{coordinator.listen}:{coordinator.port}")
    console.print(f"send every site the CA certificate {coordinator.ca_certificate}; register each site's key with "
                  f"[bold]fedistill coordinator add-site NAME KEY.pub --dir {coordinator.path}[/bold]")


@coordinator_app.command("add-site")
def add_site_command(
    name: str = typer.Argument(..., help="The site's name."),
    public_key: Path = typer.Argument(..., help="The site's node public key (the .pub file `site init` made)."),
    directory: Path = typer.Option(Path("."), "--dir", help="The coordinator directory."),
) -> None:
    """Register a site: only SuperNodes holding a registered key may join."""
    from coordinator.operator import CoordinatorDir, add_site

    try:
        entry = add_site(CoordinatorDir.load(directory), name, public_key)
    except FedistillError as err:
        raise _fail(err) from None
    make_console().print(f"registered site {name}, key {entry['fingerprint']}")


@coordinator_app.command("sites")
def sites_command(
    directory: Path = typer.Option(Path("."), "--dir", help="The coordinator directory."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """List the registered sites and their key fingerprints."""
    from coordinator.operator import CoordinatorDir

    try:
        sites = CoordinatorDir.load(directory).registry()
    except FedistillError as err:
        raise _fail(err) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps({"schema_version": 1, "sites": sites}, indent=2) + "\n")
        return
    for name, entry in sites.items():
        typer.echo(f"{name}\t{entry['fingerprint']}\tadded {entry['added_at']}")


@coordinator_app.command("start")
def start_command(directory: Path = typer.Argument(..., help="The coordinator directory.")) -> None:
    """Run the coordinator (Flower SuperLink: TLS, SuperNode authentication, no runtime installs) until stopped."""
    from coordinator.operator import CoordinatorDir, start_coordinator

    console = make_console()

    def ready(coordinator) -> None:
        console.print(f"coordinator ready on {coordinator.listen}:{coordinator.port} (TLS), "
                      f"{len(coordinator.registry())} registered site(s); log: {coordinator.path / 'logs'}")

    try:
        code = start_coordinator(CoordinatorDir.load(directory), ready)
    except FedistillError as err:
        raise _fail(err) from None
    if code:
        print_error(f"see the log in {Path(directory) / 'logs'}", heading=f"the SuperLink exited with code {code}")
        raise typer.Exit(code=1)
