"""``fedistill export``, ``fedistill verify-model`` and ``fedistill bench``: route to ``serving`` and
``compliance.model_signature``, render what they return."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from fedistill.console import make_console, print_error
from fedistill.simulate import OutputFormat
from protocols.errors import FedistillError


def _progress(console):
    status = console.status("exporting")

    def step(name: str) -> None:
        status.update(f"[bold]{escape(name)}[/bold]")

    return status, step


def export_command(
    run_dir: Path = typer.Argument(..., help="A finished run directory (runs/<run-id>)."),
    out: Path = typer.Option(..., "--out", help="The folder to write (new, empty, or an earlier export)."),
    formats: str = typer.Option("safetensors,onnx", "--format", help="safetensors, onnx (comma-separated)."),
    quantize: str = typer.Option("", "--quantize", help="int8, int4 (comma-separated; onnxruntime quantizers)."),
    signing_key: Path | None = typer.Option(None, "--signing-key", help="The coordinator's P-256 model-signing key "
                                            "(default: RUN_DIR/model_signing_key.pem, made on a simulated run's "
                                            "first export)."),
    ledger_key: Path | None = typer.Option(None, "--ledger-key", help="The coordinator's ledger key, which endorses "
                                           "the signing key (default: RUN_DIR/ledger_key.pem)."),
    inputs: Path | None = typer.Option(None, "--inputs", help="Held-out records (.npz, test.input.<name>, "
                                       "test.labels) to measure parity and quality on (default: a simulated run's "
                                       "test splits)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="A text student's tokenizer folder (default: "
                                          "the run teacher's)."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--output", help="table or json."),
) -> None:
    """Export a finished run's student: save_pretrained, ONNX, int8/int4, a model card, and an OpenSSF signature."""
    from serving.export import ExportRequest, export_run

    console = make_console(stderr=output_format is OutputFormat.json)
    try:
        request = ExportRequest(run_dir, out, ExportRequest.parse_list(formats, "--format"),
                                ExportRequest.parse_list(quantize, "--quantize"), signing_key, ledger_key, inputs,
                                tokenizer)
        status, step = _progress(console)
        with status:
            manifest = export_run(request, step)
    except FedistillError as err:
        print_error(err, "export failed")
        raise typer.Exit(code=1) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
        return
    console.print(f"[bold green]exported[/bold green] {escape(manifest['run_id'])} ({manifest['family']}) to "
                  f"{escape(str(out))}", soft_wrap=True)
    for name, record in manifest["variants"].items():
        parity = record.get("parity", {}).get("max_abs_logit_difference", record.get("max_abs_logit_difference_to_fp32"))
        text = f"not written: {record['skipped']}" if not record.get("file") else \
            f"{record['file']} (max |logit difference| {parity:.2e})"
        console.print(f"  {name}: {escape(text)}", soft_wrap=True)
    headline = manifest["headline_metric"]
    for name, quality in manifest["quality"].items():
        console.print(f"  held-out {headline}, {name}: {quality.get(headline)}")
    console.print(f"  signed: {manifest['signature']['key_fingerprint']} (model.sig); the card is README.md",
                  soft_wrap=True)


def verify_model_command(
    export_dir: Path = typer.Argument(..., help="A folder written by `fedistill export`."),
    public_key: Path | None = typer.Option(None, "--public-key", help="The model-signing public key you trust "
                                           "(default: the folder's own; compare its fingerprint)."),
    run_dir: Path | None = typer.Option(None, "--run", help="The run directory it came from, to pin its ledger."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Check an exported student: its signature, its key's endorsement, and its weights against the run's ledger."""
    from compliance.model_signature import verify_model

    try:
        result = verify_model(export_dir, public_key, run_dir)
    except FedistillError as err:
        if output_format is OutputFormat.json:
            sys.stdout.write(json.dumps({"schema_version": 1, "verified": False, "export_dir": str(export_dir),
                                         "failure": str(err)}, indent=2) + "\n")
        print_error(err, "verification failed")
        raise typer.Exit(code=1) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    console = make_console(soft_wrap=True)
    for check in result["checks"]:
        console.print(f"[green]ok[/green] {escape(check)}")
    if not result["key_pinned"]:
        console.print(f"[yellow]note[/yellow] the signing key is the folder's own: compare {result['model_signing_key']}"
                      " (or the ledger key " + result["ledger_key"] + ") with the one the consortium published, or "
                      "pass --public-key")
    console.print(f"[bold green]verified[/bold green] {escape(str(export_dir))}: run {escape(result['run_id'])}")


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    if (row["untrustworthy"] and key in ("latency_p50_ms", "latency_p99_ms", "throughput_per_s", "tokens_per_s")) or (
            row["ratio_untrustworthy"] and key in ("x_faster_batch1", "x_throughput")):
        return "untrustworthy"
    return format(value, fmt)


def bench_command(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    inputs: Path | None = typer.Option(None, "--inputs", help="Held-out records (.npz; default: a simulated run's "
                                       "test splits)."),
    teacher: Path | None = typer.Option(None, "--teacher", help="The teacher to compare with (default: RUN_DIR/teacher)."),
    threads: int = typer.Option(1, "--threads", help="Threads every model runs with."),
    quick: bool = typer.Option(False, "--quick", help="Timing blocks a quarter as long (noisier figures)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """The teacher against the student (torch fp32, ONNX fp32, int8, int4) on the same held-out inputs."""
    from protocols.canonical import atomic_write_json
    from serving.bench import bench_run

    console = make_console(stderr=output_format is OutputFormat.json)
    try:
        status = console.status("benchmarking")
        with status:
            result = bench_run(run_dir, inputs, teacher, threads, quick,
                               lambda name: status.update(f"[bold]{escape(name)}[/bold]"))
    except FedistillError as err:
        print_error(err, "bench failed")
        raise typer.Exit(code=1) from None
    if json_out is not None:
        atomic_write_json(json_out, result)
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    headline = result["headline_metric"]
    table = Table(title=f"{result['run_id']}: {result['heldout']}; {result['threads']} thread(s)")
    causal = result["family"] == "causal_lm"
    rate = "tokens/s" if causal else "per s"
    for column in ("model", "parameters", "MB", "p50 ms (b=1)", "p99 ms (b=1)", f"{rate} (b={result['throughput_batch']})",
                   "peak MiB (model)", headline, "x faster", "x throughput", "% of teacher", "vs fp32"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result["rows"]:
        table.add_row(row["model"], _cell(row, "parameters", ","), f"{row['file_bytes'] / 1e6:.3f}",
                      _cell(row, "latency_p50_ms", ".3f"), _cell(row, "latency_p99_ms", ".3f"),
                      _cell(row, "tokens_per_s" if causal else "throughput_per_s", ",.0f"), f"{row['peak_rss_mib']:.0f} ("
                      + ("n/a" if row["model_peak_mib"] is None else f"{row['model_peak_mib']:.0f}") + ")",
                      _cell(row, "headline", ".4f"), _cell(row, "x_faster_batch1", ".1f"),
                      _cell(row, "x_throughput", ".1f"),
                      "n/a" if row["quality_share"] is None else f"{100 * row['quality_share']:.1f}%",
                      "n/a" if row["headline_change_vs_fp32"] is None else f"{row['headline_change_vs_fp32']:+.4f}")
    console.print(table)
    for row in result["rows"]:
        for problem in [*row["untrustworthy"], *row["ratio_untrustworthy"], *row["memory_untrustworthy"]]:
            console.print(f"[yellow]untrustworthy[/yellow] {escape(row['model'])}: {escape(problem)}")
    machine = result["machine"]
    console.print(f"load average {machine['load_average_before'][0]:.2f} -> {machine['load_average_after'][0]:.2f} "
                  f"on {machine['cpus']} CPU(s)" + (" [yellow](busy: timings are slower than on an idle machine)"
                                                    "[/yellow]" if machine["busy"] else ""))
