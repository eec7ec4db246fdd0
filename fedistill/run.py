"""``fedistill run run.toml``: launch a run on a running coordinator and wait for its final status."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from fedistill.console import make_console, print_error
from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError


def run_command(
    run_file: Path = typer.Argument(..., help="The run's run.toml."),
    resume: str = typer.Option(None, "--resume", help="Continue this run from its last completed round."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Submit a run (or resume one after a coordinator crash) and report how it finished."""
    from coordinator.launch import RunFile, submit, wait_for

    console = make_console(stderr=output_format is OutputFormat.json)
    try:
        run = RunFile.load(run_file)
        flower_run_id = submit(run, resume)
        console.print(f"run {resume or flower_run_id} submitted (Flower run {flower_run_id}); waiting for it to finish")
        with console.status("running") as status:
            outcome = wait_for(run, flower_run_id, resume,
                               lambda record: status.update(f"{record.get('status')} ({record.get('elapsed', '')})"))
    except FedistillError as err:
        print_error(err)
        raise typer.Exit(code=1) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(outcome.to_dict(), indent=2) + "\n")
    else:
        colour = "green" if outcome.completed else "red"
        console.print(f"[{colour}]run {outcome.run_id}: {outcome.status}[/{colour}] {escape(outcome.details)}")
        console.print(f"run directory: {outcome.run_dir}")
    if not outcome.completed:
        raise typer.Exit(code=1)
