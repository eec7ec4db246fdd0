"""``fedistill coordinator ...``: what the consortium operator runs on the coordinator machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from fedistill.console import make_console, print_error
from fedistill.simulate import OutputFormat
from protocols.errors import ConfigError, FedistillError

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


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"--layers: give teacher layer indices separated by commas, e.g. 0,8,17; got "
                                 f"{text!r}.") from None


@coordinator_app.command("proxy-set")
def proxy_set_command(
    records: Path = typer.Argument(..., help="Public records (.csv, .jsonl or .parquet): never a site's."),
    out: Path = typer.Argument(..., help="The proxy set file to write (safetensors; ship it to every site)."),
    features: str = typer.Option(None, "--features", help="A classification run: the feature columns, "
                                                          "comma-separated, in the order the sites' [data] features "
                                                          "give them."),
    text: str = typer.Option(None, "--text", help="A causal-LM run: the column of public prompts, tokenized by "
                                                  "--tokenizer to --max-length (the run's student max_length)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="With --text: the run's teacher (a checkpoint folder or "
                                                             "a GGUF file), whose tokenizer every site uses."),
    max_length: int = typer.Option(None, "--max-length", help="With --text: tokens per prompt."),
    sample: int = typer.Option(None, "--sample", help="Keep a seeded sample of this many records (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seeds --sample."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Write a knowledge run's proxy set: the feature columns of public records, without labels (--features), or
    public prompts as the run's teacher tokenizes them (--text). Name it in run.toml (proxy_set) and send it to every
    site (site.toml [knowledge] proxy_set); its SHA-256 registers it."""
    import numpy as np

    from client.records import load_inputs, read_table
    from protocols.canonical import atomic_write_bytes, sha256_hex
    from protocols.knowledge import proxy_file_bytes

    try:
        if (features is None) == (text is None):
            raise ConfigError("give --features (a classification run's feature columns) or --text (a causal-LM "
                              "run's prompt column), one of the two.")
        if text is not None:
            if tokenizer is None or max_length is None:
                raise ConfigError("--text needs --tokenizer (the run's teacher) and --max-length (the student's).")
            from coordinator.public_stage import public_split
            from distill.causal_lm import load_causal_lm_teacher

            frame = read_table(records)
            if text not in frame.columns:
                raise ConfigError(f"--text: {records} has no column '{text}'; its columns are "
                                  f"{', '.join(map(str, frame.columns))}.")
            columns = (text,)
            inputs = public_split(load_causal_lm_teacher(tokenizer).tokenizer,
                                  frame[text].astype(str).tolist(), max_length).inputs
        else:
            columns = tuple(name.strip() for name in features.split(",") if name.strip())
            if not columns:
                raise ConfigError("--features: name at least one feature column.")
            inputs = load_inputs(records, columns)
        count = len(next(iter(inputs.values())))
        if sample is not None:
            if not 1 <= sample <= count:
                raise ConfigError(f"--sample must be between 1 and the {count} records of {records}, got {sample}.")
            chosen = np.sort(np.random.default_rng(seed).choice(count, sample, replace=False))
            inputs = {name: values[chosen] for name, values in inputs.items()}
        data = proxy_file_bytes(inputs)
        atomic_write_bytes(out, data)
    except FedistillError as err:
        raise _fail(err) from None
    record = {"schema_version": 1, "proxy_set": str(out), "records": len(next(iter(inputs.values()))),
              "columns": list(columns), "sha256": sha256_hex(data)}
    if "attention_mask" in inputs:
        record["proxy_positions"] = int(inputs["attention_mask"].sum())
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
        return
    shape = (f"{record['records']} prompts, {record['proxy_positions']} real token positions" if text is not None
             else f"{record['records']} records x {len(columns)} features")
    make_console().print(f"proxy set {out}: {shape}, SHA-256 {record['sha256']} (name it in run.toml proxy_set; "
                         "send it to every site)")


@coordinator_app.command("base-student")
def base_student_command(
    out: Path = typer.Argument(..., help="The base student folder to write (save_pretrained, with the tokenizer)."),
    teacher: Path = typer.Option(..., "--teacher", help="The consortium's causal-LM teacher: a GGUF file or a "
                                                        "checkpoint folder. It must be public: it never saw a site's "
                                                        "records."),
    layers: str = typer.Option(..., "--layers", help="The teacher layers the student keeps, e.g. 0,8,17."),
    public: Path = typer.Option(None, "--public", help="A public corpus: UTF-8 text, one document per line. Chooses "
                                                       "the vocabulary subset and feeds the public stage."),
    vocabulary: int = typer.Option(None, "--vocabulary", help="Keep this many teacher tokens (the most frequent in "
                                                              "--public) plus <oov>; default: the whole vocabulary."),
    max_length: int = typer.Option(32, "--max-length", help="Tokens per text (the run's max_length)."),
    steps: int = typer.Option(0, "--steps", help="Public-stage KD steps on --public (0: no public stage)."),
    public_texts: int = typer.Option(None, "--public-texts", help="Distil on a fixed sample of this many public "
                                                                  "texts (default: all)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Public-stage batch size."),
    learning_rate: float = typer.Option(5e-4, "--learning-rate", help="Public-stage learning rate (Adam)."),
    top_k: int = typer.Option(16, "--top-k", help="Teacher tokens per position in the public-stage targets."),
    temperature: float = typer.Option(1.0, "--temperature", help="Public-stage distillation temperature."),
    seed: int = typer.Option(0, "--seed", help="Seeds the public sample and the stage's batches."),
    cache: Path = typer.Option(None, "--cache", help="Where the teacher's public targets are cached (default: "
                                                     "OUT's parent/.public-topk)."),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Build the run's base student once, before the federation: a layer subset of the teacher, optionally on a
    vocabulary subset and distilled on public text (the coordinator's stage: no site record, no privacy budget).
    Send the folder to every site; its digest is the run's base_digest."""
    from coordinator.public_stage import PublicStageSettings, build_base_student, read_public_texts
    from distill.causal_lm import load_causal_lm_teacher

    console = make_console(stderr=output_format is OutputFormat.json, soft_wrap=True)
    try:
        if steps < 0:
            raise ConfigError(f"--steps must be 0 (no public stage) or more, got {steps}.")
        if (steps or vocabulary) and public is None:
            raise ConfigError("--public is needed for --steps and --vocabulary: the public stage and the vocabulary "
                              "subset come from public text only.")
        texts = read_public_texts(public) if public is not None else ()
        stage = (PublicStageSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate, top_k=top_k,
                                     temperature=temperature, seed=seed) if steps else None)
        with console.status(f"loading the teacher {teacher}"):
            loaded = load_causal_lm_teacher(teacher)
        with console.status("building the base student" + (f" and distilling it {steps} steps on public text"
                                                           if stage else "")):
            record = build_base_student(loaded, out, _layer_list(layers), texts, max_length, vocabulary, stage,
                                        public_texts, cache or Path(out).resolve().parent / ".public-topk")
    except FedistillError as err:
        raise _fail(err) from None
    if output_format is OutputFormat.json:
        sys.stdout.write(json.dumps({"schema_version": 1, **record}, indent=2) + "\n")
        return
    console.print(f"base student {record['base']}: teacher layers {record['teacher_layers']}, vocabulary "
                  f"{record['vocabulary_tokens'] or 'as the teacher'}")
    stage_record = record["public_stage"]
    if stage_record:
        console.print(f"public stage: {stage_record['settings']['steps']} steps on {stage_record['public_texts']} "
                      f"public texts ({stage_record['public_tokens']} tokens), mean loss "
                      f"{stage_record['mean_loss']:.4f}; no site record read, no privacy budget spent")
    console.print(f"base_digest = \"{record['base_digest']}\"  (put it in run.toml; send the folder to every site)")
