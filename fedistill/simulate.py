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

from fedistill.console import make_console, print_error
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
        auc, perplexity = overall.get("roc_auc"), overall.get("perplexity")
        text = (f"ROC-AUC {auc:.4f}" if auc is not None else f"perplexity {perplexity:.2f}" if perplexity is not None
                else record["status"])
        if record.get("refusals"):
            text += f"  refused: {', '.join(sorted(record['refusals']))}"
        self.progress.update(self.task, advance=1, description=text)
        if record["round"] == self.progress.tasks[0].total or record["status"] == "stopped":
            self.progress.stop()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _render_causal_lm(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{summary['scenario']}: {len(summary['sites'])} sites, {summary['rounds']} rounds "
                        "(pooled held-out texts; perplexity: lower is better)")
    table.add_column("model", no_wrap=True)
    for metric in ("perplexity", "top-1 agreement with the teacher", "tokens"):
        table.add_column(metric, justify="right")
    for key, label in summary["model_labels"].items():
        overall = summary["models"][key]["overall"]
        table.add_row(label, _fmt(overall["perplexity"]), _fmt(overall["top1_agreement"]), str(overall["tokens"]))
    console.print(table)
    comparison, size = summary["comparison"], summary["size"]
    for key, text in (("federated_over_undistilled", "undistilled"),
                      ("federated_over_public_only", "public-only"),
                      ("federated_over_centralized", "centralized distilled (non-private)"),
                      ("federated_over_centralized_private", "centralized distilled at the same epsilon")):
        if key in comparison:
            console.print(f"federated perplexity / {text} perplexity: {comparison[key]:.3f}")
    latency = size["latency_ms_per_token"]
    console.print(f"student/teacher non-embedding parameters: {size['student']['non_embedding']:,} / "
                  f"{size['teacher']['non_embedding']:,} = {size['non_embedding_ratio']:.3f}; CPU ms per generated "
                  f"token: {latency['student']:.1f} / {latency['teacher']:.1f} ({latency['speedup']:.2f}x faster)")
    causal = summary["causal_lm"]
    console.print(f"fragments: {causal['fragments']}; top-{causal['top_k']} targets at T in "
                  f"{causal['temperatures']}, {causal['divergence']}; sent per site and round: " + ", ".join(
                      f"{site} {sent['bytes']:,} B" for site, sent in causal["sent_per_round"].items()))
    console.print(f"deployable student (save_pretrained): {causal['exported_student']}")


def render_summary(summary: dict[str, Any], console: Console) -> None:
    if summary.get("task") == "causal-lm":
        _render_causal_lm(summary, console)
        _render_privacy(summary, console)
        return
    models = summary["models"]
    table = Table(title=f"{summary['scenario']}: {len(summary['sites'])} sites, {summary['rounds']} rounds "
                        f"(pooled test splits; threshold chosen on validation)")
    table.add_column("model", no_wrap=True)
    for metric in ("roc_auc", "accuracy", "macro_f1", "kappa"):
        table.add_column(metric.replace("_", "-").replace("roc-auc", "ROC-AUC"), justify="right")
    for label, key in (("teacher", "teacher"), ("centralized distilled student", "centralized_distilled"),
                       ("centralized labels-only student", "centralized_labels_only"),
                       ("public-only student (no site data)", "public_only"),
                       ("federated student", "federated")):
        if key not in models:
            continue
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
    if len(summary.get("stages", [])) > 1:
        console.print("stages (pooled-test ROC-AUC; public held-out): " + " -> ".join(
            f"{stage['stage']} {_fmt((stage.get('evaluation') or {}).get('roc_auc'))}"
            + (f" ({_fmt(stage['public_holdout']['roc_auc'])})" if stage.get("public_holdout") else "")
            for stage in summary["stages"]))
    if summary.get("kept_round") is not None:
        scores = summary["validation_by_round"]
        console.print(f"kept round {summary['kept_round']} of {summary['rounds']}: the best pooled validation ROC-AUC "
                      f"the sites released ({_fmt(scores.get(str(summary['kept_round'])))}; round 0 is the start)")
    if "federated_minus_public_only" in comparison:
        console.print(f"federated - public-only ROC-AUC: {comparison['federated_minus_public_only']:+.4f} (the "
                      "free alternative: the same student distilled on the public reference set alone)")
    _render_privacy(summary, console)
    _render_site_evaluation(summary, console)


def _render_site_evaluation(summary: dict[str, Any], console: Console) -> None:
    evaluations = summary.get("site_evaluation") or []
    if not evaluations:
        return
    final = evaluations[-1]
    pooled, interval = final["pooled"], final["pooled"].get("noise_interval_90", {})
    released = sorted({site["released"] for site in final["sites"].values()})
    spread = (f" (the noise alone: {interval['roc_auc'][0]:.3f} - {interval['roc_auc'][1]:.3f})"
              if interval.get("roc_auc") else "")
    console.print(f"the sites' own test evaluation after round {final['after_round']} ({', '.join(released)}, "
                  f"{pooled['sites']} site(s)): ROC-AUC {_fmt(pooled.get('roc_auc'))}{spread}, accuracy "
                  f"{_fmt(pooled.get('accuracy'))}; what a deployed run reports")


def _group_note(site: dict[str, Any]) -> str:
    bound = site.get("person_level")
    if site["unit"] == "person" or bound is None or bound["k"] <= 1:
        return ""
    return (f" (a person is protected only by group privacy: epsilon {bound['epsilon']:.3g}, delta "
            f"{bound['delta']:.2g}{', vacuous' if bound['vacuous'] else ''})")


def _render_privacy(summary: dict[str, Any], console: Console) -> None:
    privacy = summary["privacy"]
    console.print(f"privacy: {privacy['mechanism']}; unit: {privacy['unit']}")
    for name, site in privacy["sites"].items():
        spent = site["epsilon"] if isinstance(site["epsilon"], str) else f"{site['epsilon']:.3f}"
        delta = "" if site["delta"] is None else f" at delta {site['delta']:.2g}"
        refused = f", refused rounds {site['rounds_refused']}" if site["rounds_refused"] else ""
        lifetime = site.get("epsilon_lifetime")
        if site.get("runs_in_account", 1) > 1 and lifetime is not None:
            spent_life = lifetime if isinstance(lifetime, str) else f"{lifetime:.3f}"
            refused += f"; lifetime epsilon {spent_life} over {site['runs_in_account']} runs"
        chosen = site.get("training_set")
        if chosen is not None and chosen["records"] == "new":
            refused += f"; trained on {chosen['new']} new record(s) plus {chosen['replay']} replayed"
        console.print(f"  {name}: epsilon {spent}{delta} per {site['unit']}{refused}; up to "
                      f"{site['max_records_per_person']} record(s) per person{_group_note(site)}")
    if summary["stopped"]:
        console.print(f"[yellow]run stopped in round {summary['stopped']['round']}: {summary['stopped']['reason']}")
    console.print(f"run directory: {summary['paths']['run_dir']}")


def render_sweep(sweep: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{sweep['scenario']}: utility against privacy (seed {sweep['seed']}; unit: "
                        f"{sweep['unit_of_privacy']})")
    metrics = sweep["metrics"]
    table.add_column("target epsilon", justify="right")
    for metric in metrics:
        table.add_column(metric.replace("_", "-").replace("roc-auc", "ROC-AUC"), justify="right")
    table.add_column("epsilon spent per site (min - max)", justify="right")
    table.add_column("refusals")
    for row in sweep["levels"]:
        spent = [v for v in row["epsilon_spent"].values() if not isinstance(v, str)]
        spent_text = f"{min(spent):.3f} - {max(spent):.3f}" if spent else "inf (no DP)"
        refused = ", ".join(f"{site}: rounds {rounds}" for site, rounds in row["rounds_refused"].items()) or "none"
        table.add_row(row["target_epsilon"], *(_fmt(row["federated"][m]) for m in metrics), spent_text, refused)
    console.print(table)
    base = sweep["baselines"]
    console.print(f"non-private baselines ({sweep['headline_metric']}): " + ", ".join(
        f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in base.items()))
    console.print(f"sweep directory: {sweep['sweep_dir']}")


def parse_levels(text: str) -> list[float]:
    levels = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            levels.append(float("inf") if part in ("inf", "none") else float(part))
        except ValueError:
            raise FedistillError(f"--epsilon: {part!r} is not a number; give a list like 1,3,8,inf.") from None
    return levels


def parse_failures(entries: list[str]) -> tuple[tuple[str, int], ...]:
    failures = []
    for entry in entries:
        site, _, server_round = entry.rpartition(":")
        if not site or not server_round.isdigit():
            raise FedistillError(f"--fail-site {entry!r}: expected SITE:ROUND, e.g. --fail-site nicu:2.")
        failures.append((site, int(server_round)))
    return tuple(failures)


def parse_caps(entries: list[str]) -> dict[str, float]:
    caps = {}
    for entry in entries:
        name, _, value = entry.partition("=")
        try:
            caps[name.strip()] = float(value)
        except ValueError:
            raise FedistillError(f"--site-cap {entry!r}: expected SITE=EPSILON, e.g. --site-cap nicu=2.") from None
    return caps


def parse_site_students(entries: list[str]) -> dict[str, tuple[int, ...]]:
    students = {}
    for entry in entries:
        name, _, widths = entry.partition("=")
        try:
            students[name.strip()] = tuple(int(width) for width in widths.split(",") if width.strip())
        except ValueError:
            raise FedistillError(f"--site-student {entry!r}: expected SITE=W1,W2 (hidden widths), e.g. "
                                 "--site-student nicu=64,64.") from None
    return students


def parse_stages(text: str) -> tuple[str, ...]:
    stages = tuple(part.strip() for part in text.split(",") if part.strip())
    if not stages:
        raise FedistillError("--stages: name at least the federated stage, e.g. --stages coordinator,federated.")
    return stages


def simulate_command(
    scenario: str = typer.Option("hospitals", help="Scenario: hospitals, drug-reviews or health-tweets (causal LM)."),
    preset: str | None = typer.Option(None, help="A scenario's size, where it has several (health-tweets: smoke, "
                                                 "tiny (default), full)."),
    stages: str | None = typer.Option(None, help="The curriculum's stages in order, from coordinator, federated, "
                                                 "site-local (e.g. coordinator,federated); default: the scenario's."),
    sites: int | None = typer.Option(None, help="Number of sites (default: the scenario's)."),
    rounds: int | None = typer.Option(None, help="Federated rounds (default: the scenario's)."),
    seed: int = typer.Option(0, help="Seed for splits, initialisation and training."),
    out: Path = typer.Option(Path("runs"), help="Parent directory of the run directory."),
    subsample: float = typer.Option(1.0, help="Keep this fraction of each site's patients (quick runs)."),
    fragment_plan: str | None = typer.Option(None, help="all, cyclic or progressive."),
    local_steps: int | None = typer.Option(None, help="Local optimizer steps per site per round (default: the scenario's)."),
    batch_size: int | None = typer.Option(None, help="Expected batch size (Poisson sampling rate = batch / records)."),
    learning_rate: float | None = typer.Option(None, help="Local learning rate (default: the scenario's)."),
    epsilon: str | None = typer.Option(None, help="Target epsilon per site per run; a list (1,3,8,inf) runs a "
                                                  "sweep; inf = no DP. Default: the scenario's."),
    delta: float | None = typer.Option(None, help="Target delta (each site uses at most 1/(10 n) anyway)."),
    clip: float | None = typer.Option(None, help="DP-SGD per-sample gradient clipping norm."),
    grad_sample_mode: str | None = typer.Option(None, help="ghost (default) or hooks."),
    privacy_unit: str = typer.Option("person", help="person (default: all of a person's records sampled and clipped "
                                                    "as one, where the data names persons) or record."),
    test_metrics: str = typer.Option("noised", help="How the sites release their test evaluation of the student: "
                                                    "noised (default, charged to their budget), clear or none."),
    evaluate_every: int | None = typer.Option(None, help="The sites evaluate after every N-th round and the last "
                                                         "(default 0: the last only)."),
    accountant: str = typer.Option("prv", help="The simulated sites' accountant: prv or rdp."),
    site_cap: list[str] = typer.Option([], help="SITE=EPSILON: that simulated site's per-run cap (repeatable)."),
    max_records_per_person: int | None = typer.Option(None, help="Keep at most k training records per person."),
    min_sites: int | None = typer.Option(None, help="Stop the run when fewer sites accept a round."),
    sites_per_round: int | None = typer.Option(None, help="Partial participation: ask this many sites each round, "
                                                          "drawn afresh from the run's seed; the others spend nothing."),
    fraction_per_round: float | None = typer.Option(None, help="Partial participation: ask this share of the sites "
                                                               "each round (instead of --sites-per-round)."),
    secure_aggregation: bool = typer.Option(True, help="Every update through Flower's SecAgg+ (the default)."),
    drop_rate: float = typer.Option(0.0, help="Fault injection: each site crashes in a round with this probability."),
    fail_site: list[str] = typer.Option([], help="Fault injection: SITE:ROUND crashes that site in that round "
                                                 "(repeatable)."),
    from_run: Path | None = typer.Option(None, "--from", help="RUN_DIR: continue that finished run, from its "
                                                              "student, once it verifies; its sites go on with their "
                                                              "ledgers and lifetime budgets."),
    data_share: float = typer.Option(1.0, help="Each site trains on this share of its persons (the rest arrives "
                                               "later: run again with --from and a larger share)."),
    incremental: bool = typer.Option(False, "--incremental", help="Each site trains only on records it has not "
                                                                  "trained on in an earlier run, plus its replay "
                                                                  "buffer."),
    keep_best: bool = typer.Option(False, "--keep-best", help="Keep the round whose student scored best on the "
                                                            "validation ROC-AUC the sites release, not the last."),
    replay_min_entropy: float | None = typer.Option(None, help="With --incremental: replay earlier records whose "
                                                               "teacher entropy is at least this share of its "
                                                               "maximum (0-1); default: no replay."),
    knowledge_mode: str = typer.Option("weights", help="What travels up each round: weights (fragment updates), "
                                                       "knowledge (only soft labels on the public proxy set, "
                                                       "distilled at the coordinator) or hybrid (both)."),
    knowledge_source: str = typer.Option("local-student", help="Where the sites' soft labels come from: "
                                                               "local-student (the site's student after its DP-SGD "
                                                               "steps), public-teacher, or pate (hybrid mode: an "
                                                               "ensemble of teachers on disjoint partitions of the "
                                                               "site's records by person, noised once per run)."),
    proxy_records: int | None = typer.Option(None, help="Knowledge runs: a seeded sample of this many public inputs "
                                                        "as the proxy set (default: all of them)."),
    pate_teachers: int | None = typer.Option(None, help="Source pate: teachers in each site's ensemble (default 16)."),
    pate_noise_multiplier: float | None = typer.Option(None, help="Source pate: Gaussian noise on the ensemble's "
                                                                  "summed probabilities, as a multiple of their L2 "
                                                                  "sensitivity (default 4)."),
    site_student: list[str] = typer.Option([], help="SITE=W1,W2: in knowledge mode that site trains its own MLP "
                                                    "student with these hidden widths (repeatable; SITE= for a "
                                                    "linear one)."),
    shared_tokens: int = typer.Option(63, help="Causal-LM knowledge runs: the tokens each release gives a "
                                               "probability (the most frequent in the proxy prompts), besides one "
                                               "bucket for every other token."),
    server_steps: int | None = typer.Option(None, help="Knowledge runs: the coordinator's distillation steps per "
                                                       "round on the proxy set (default 200)."),
    server_learning_rate: float | None = typer.Option(None, help="Knowledge runs: the coordinator's distillation "
                                                                 "learning rate (default 1e-3, Adam)."),
    parties: Path | None = typer.Option(None, "--parties", help="The operator's parties.toml (legal entities, roles, "
                                                               "intended use, regimes declared), recorded in the "
                                                               "coordinator's ledger; examples/parties/."),
    site_governance: Path | None = typer.Option(None, "--site-governance", help="A TOML of [governance.SITE] tables "
                                                                                "(each site's records of processing, "
                                                                                "as its site.toml [governance]); "
                                                                                "recorded in each site's ledger."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    report: bool = typer.Option(False, "--report", help="Then write each run's compliance report (RUN_DIR/report: "
                                                        "json, html, pdf; fedistill report) and print where."),
) -> None:
    """Run a multi-site federated distillation simulation, with baselines, and print the comparison."""
    from compliance.render import chromium_path
    from protocols.governance import load_parties, load_site_governance
    from simulations.runner import SimulationOptions, simulate, simulate_sweep

    console = make_console(stderr=output_format is OutputFormat.json)
    try:
        levels = parse_levels(epsilon) if epsilon is not None else []
        options = SimulationOptions(scenario=scenario, sites=sites, rounds=rounds, seed=seed, out=out,
                                    subsample=subsample, fragment_plan=fragment_plan, local_steps=local_steps,
                                    batch_size=batch_size, learning_rate=learning_rate, epsilon=levels[0] if len(levels) == 1 else None,
                                    delta=delta, max_grad_norm=clip, grad_sample_mode=grad_sample_mode,
                                    privacy_unit=privacy_unit, test_metrics=test_metrics,
                                    evaluate_every=evaluate_every,
                                    accountant=accountant, site_caps=parse_caps(site_cap),
                                    max_records_per_person=max_records_per_person, min_sites=min_sites,
                                    sites_per_round=sites_per_round, fraction_per_round=fraction_per_round,
                                    drop_rate=drop_rate, fail_sites=parse_failures(fail_site),
                                    secure_aggregation=secure_aggregation, preset=preset,
                                    stages=parse_stages(stages) if stages is not None else None,
                                    from_run=from_run, data_share=data_share, incremental=incremental,
                                    replay_min_entropy=replay_min_entropy, keep_best=keep_best,
                                    knowledge_mode=knowledge_mode, knowledge_source=knowledge_source,
                                    proxy_records=proxy_records, pate_teachers=pate_teachers,
                                    pate_noise_multiplier=pate_noise_multiplier,
                                    site_students=parse_site_students(site_student), shared_tokens=shared_tokens,
                                    server_steps=server_steps,
                                    server_learning_rate=server_learning_rate,
                                    parties=load_parties(parties) if parties is not None else None,
                                    site_governance=load_site_governance(site_governance)
                                    if site_governance is not None else {})
        if report:
            chromium_path()  # the PDF printer is checked before the run, not after it
        if len(levels) > 1:
            for level in levels:
                SimulationOptions(epsilon=level)
            result = simulate_sweep(options, levels, RichReporter(console))
        else:
            result = simulate(options, RichReporter(console))
    except FedistillError as err:
        print_error(err)
        raise typer.Exit(code=2) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif len(levels) > 1:
        render_sweep(result, console)
    else:
        render_summary(result, console)
    if report:
        from fedistill.report import write_and_print

        run_dirs = [row["run_dir"] for row in result["levels"]] if len(levels) > 1 else [result["paths"]["run_dir"]]
        for run_dir in run_dirs:
            # Under --format json stdout is the summary alone, so the report's paths go to stderr.
            write_and_print(Path(run_dir), to_stderr=output_format is OutputFormat.json)
