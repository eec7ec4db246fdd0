"""``fedistill run run.toml``: launch a run on a running coordinator and wait for its final status."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from fedistill.console import make_console, print_error
from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError

if TYPE_CHECKING:
    from coordinator.launch import CoordinatorStageRun, RunFile


def run_command(
    run_file: Path = typer.Argument(..., help="The run's run.toml."),
    resume: str = typer.Option(None, "--resume", help="Continue this run from its last completed round."),
    from_run: Path | None = typer.Option(None, "--from", help="RUN_DIR: start from that finished run's student, once "
                                                              "it verifies; give it again with --resume."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Submit a run (or resume one after a coordinator crash) and report how it finished.

    A curriculum's coordinator stage runs first, here, on run.toml's [coordinator_stage] public records and teacher;
    a resumed run starts from the copy its run directory holds instead.
    """
    from coordinator.launch import RunFile, submit, wait_for

    console = make_console(stderr=output_format is OutputFormat.json)
    try:
        run = RunFile.load(run_file)
        if from_run is not None:
            from compliance.continuation import continuation_of

            with console.status(f"verifying {from_run} before continuing it"):
                run = run.continuing(continuation_of(from_run, run.federation.student))
            console.print(f"continuing run {run.federation.continues.run_id}: it verifies; starting from its student "
                          f"{run.federation.continues.student_digest[:12]}...")
        stage = None
        if run.coordinator_stage is not None and resume is None:
            with console.status("coordinator stage: distilling the public teacher on the public records"):
                stage = _coordinator_stage(run)
            console.print(f"coordinator stage ran: {stage.records} public records ({stage.held_out} held out), "
                          f"{stage.synthetic_records} synthetic, {stage.steps} steps, {stage.seconds:.1f} s; no site "
                          f"record read, no privacy budget spent; student {stage.student_digest[:12]}...")
        flower_run_id = submit(run, resume, stage.directory if stage else None,
                               Path(from_run) / "student" / "model.safetensors" if from_run is not None else None)
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


def _coordinator_stage(run: RunFile) -> CoordinatorStageRun:
    """The stage runs in coordinator/; its records go through the sites' own reader (client.records)."""
    from client.records import RecordSchema, load_records
    from coordinator.launch import prepare_coordinator_stage

    return prepare_coordinator_stage(run, lambda table: load_records(
        table.records, RecordSchema(table.label, table.classes, table.features, table.person_id)))
