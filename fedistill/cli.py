"""The ``fedistill`` command: a thin typer router; each command group lives in its own module."""

from __future__ import annotations

import os

import typer

from fedistill import __version__

# Offline by design: nothing is ever fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# transformers' own loading/saving progress bars would interleave with ours.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# ... and so would the GGUF loader's plain tqdm bar (tqdm reads TQDM_* defaults from the environment).
os.environ.setdefault("TQDM_DISABLE", "1")

app = typer.Typer(help="Federated knowledge distillation with site-enforced privacy budgets.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedistill {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """fedistill command line."""


from fedistill import report as _report  # noqa: E402
from fedistill import run as _run  # noqa: E402
from fedistill import serve as _serve  # noqa: E402
from fedistill import simulate as _simulate  # noqa: E402
from fedistill import verify as _verify  # noqa: E402
from fedistill.coordinator import coordinator_app  # noqa: E402
from fedistill.site import site_app  # noqa: E402

app.command("simulate")(_simulate.simulate_command)
app.command("verify")(_verify.verify_command)
app.command("report")(_report.report_command)
app.command("run")(_run.run_command)
app.command("export")(_serve.export_command)
app.command("verify-model")(_serve.verify_model_command)
app.command("bench")(_serve.bench_command)
app.add_typer(site_app, name="site")
app.add_typer(coordinator_app, name="coordinator")
