"""``fedistill simulate``: a multi-site simulation with a progress bar and a comparison table."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from protocols.errors import FedistillError


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class RichReporter:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def stage(self, text: str) -> None:
        self.console.log(text)

    def rounds_started(self, total: int) -> None:
        self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(), console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("", total=total)

    def round_finished(self, record: dict[str, Any]) -> None:
        overall = record.get("evaluation", {}).get("overall", {})
        auc = overall.get("roc_auc")
        text = f"ROC-AUC {auc:.4f}" if auc is not None else record["status"]
        self.progress.update(self.task, advance=1, description=text)
        if record["round"] == self.progress.tasks[0].total:
            self.progress.stop()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render_summary(summary: dict[str, Any], console: Console) -> None:
    models = summary["models"]
    table = Table(title=f"{summary['scenario']}: {len(summary['sites'])} sites, {summary['rounds']} rounds "
                        f"(pooled test splits; threshold chosen on validation)")
    table.add_column("model", no_wrap=True)
    for metric in ("roc_auc", "accuracy", "macro_f1", "kappa"):
        table.add_column(metric.replace("_", "-").replace("roc-auc", "ROC-AUC"), justify="right")
    for label, key in (("teacher", "teacher"), ("centralized distilled student", "centralized_distilled"),
                       ("centralized labels-only student", "centralized_labels_only"),
                       ("federated student", "federated")):
        overall = models[key]["overall"]
        table.add_row(label, *(_fmt(overall[m]) for m in ("roc_auc", "accuracy", "macro_f1", "kappa")))
    local = models["local_only"]
    table.add_row("local-only students: mean [min, max]", *(
        "n/a" if local[m] is None else f"{local[m]['mean']:.4f} [{local[m]['min']:.3f}, {local[m]['max']:.3f}]"
        for m in ("roc_auc", "accuracy", "macro_f1", "kappa")))
    console.print(table)
    size = summary["size"]
    console.print(f"student/teacher size ({size['measure']}): {size['student']:,} / {size['teacher']:,} = "
                  f"{size['ratio']:.4f}")
    comparison = summary["comparison"]
    if "federated_minus_centralized" in comparison:
        console.print(f"federated - centralized distilled ROC-AUC: {comparison['federated_minus_centralized']:+.4f}")
    console.print(f"run directory: {summary['paths']['run_dir']}")


def simulate_command(
    scenario: str = typer.Option("hospitals", help="Scenario: hospitals or drug-reviews."),
    sites: int | None = typer.Option(None, help="Number of sites (default: the scenario's)."),
    rounds: int | None = typer.Option(None, help="Federated rounds (default: the scenario's)."),
    seed: int = typer.Option(0, help="Seed for splits, initialisation and training."),
    out: Path = typer.Option(Path("runs"), help="Parent directory of the run directory."),
    subsample: float = typer.Option(1.0, help="Keep this fraction of each site's patients (quick runs)."),
    fragment_plan: str | None = typer.Option(None, help="all, cyclic or progressive."),
    local_steps: int | None = typer.Option(None, help="Local optimizer steps per site per round (default: the scenario's)."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Run a multi-site federated distillation simulation, with baselines, and print the comparison."""
    from simulations.runner import SimulationOptions, simulate

    console = Console(stderr=output_format is OutputFormat.json)
    try:
        options = SimulationOptions(scenario=scenario, sites=sites, rounds=rounds, seed=seed, out=out,
                                    subsample=subsample, fragment_plan=fragment_plan, local_steps=local_steps)
        summary = simulate(options, RichReporter(console))
    except FedistillError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        render_summary(summary, console)
