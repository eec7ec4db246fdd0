"""``fedistill bench RUN_DIR``: the teacher against the student in torch fp32, ONNX fp32, int8 and int4, in one run,
on the same held-out inputs.

Each model is measured in a worker process of its own (``python -m serving.bench``), all loaded side by side, so its
peak memory is its own: the worker restarts its high-water mark after the imports, loads the model and scores the
held-out inputs; a worker without a model gives the baseline. The workers are then timed in turns, block k of every
model before block k+1 of any (:data:`LATENCY_BLOCKS` blocks of batch 1 and of batch :data:`THROUGHPUT_BATCH`), so
a machine that slows down slows them all, and the speed ratios are taken block by block. All models run with the
same thread count (``--threads``, 1 by default: per-core figures are the ones that survive a busy machine).

Every figure is checked before it is printed: finite and positive; the batch-1 latency blocks agree within
:data:`STABLE_SPREAD`; the block-by-block speed-ups agree within :data:`STABLE_RATIO_SPREAD`; the model's memory is
above what the baseline resolves. The machine's load average is recorded before and after. A figure that fails is
printed as "untrustworthy" with the reason, never as a number.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
THROUGHPUT_BATCH = 64
# A causal LM's batch holds sequences, each a [length, vocabulary] block of logits (262,144 wide for Gemma).
CAUSAL_THROUGHPUT_BATCH = 8
MIN_LATENCY_CALLS = 60
# Seconds per timing block (batch 1, then batch THROUGHPUT_BATCH) and of the warm-up; --quick divides them by 4.
LATENCY_BLOCK_SECONDS = 0.4
THROUGHPUT_BLOCK_SECONDS = 0.3
LATENCY_BLOCKS = 5
WARM_UP_SECONDS = 1.0
BLOCK_WARM_UP_SECONDS = 0.1
QUICK_FACTOR = 4
STABLE_SPREAD = 0.5
STABLE_RATIO_SPREAD = 0.5
WORKER_TIMEOUT_S = 900


# --------------------------------------------------------------------------------------------- the worker
def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    """The resident set's high-water mark since :func:`_reset_peak` (since the start where the kernel cannot reset it)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Start the high-water mark again from the current resident set (Linux's clear_refs, value 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _predictor(job: dict[str, Any]):
    """A function from named input arrays to logits, for the job's model."""
    kind = job["kind"]
    if kind == "baseline":  # everything but a model: what the other jobs' memory is measured against
        return lambda inputs: np.zeros((len(next(iter(inputs.values()))), 2), dtype=np.float32)
    if kind == "teacher" and job["family"] == "causal_lm":
        import torch

        from distill.causal_lm import load_causal_lm_teacher
        from distill.causal_train import causal_logits

        model = load_causal_lm_teacher(Path(job["path"])).model

        @torch.no_grad()
        def next_tokens(inputs: dict[str, np.ndarray]) -> np.ndarray:
            return causal_logits(model, torch.from_numpy(inputs["input_ids"]),
                                 torch.from_numpy(inputs["attention_mask"])).numpy()

        return next_tokens
    if kind == "teacher":
        from distill.models import load_teacher

        return load_teacher(Path(job["path"])).logits
    if kind == "torch":
        import torch

        from serving.artefacts import finished_student, logits_module, input_names

        student = finished_student(Path(job["path"]))
        module, names = logits_module(student), input_names(student.family)

        @torch.no_grad()
        def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
            return module(*(torch.from_numpy(inputs[name]) for name in names)).numpy()

        return predict
    from serving.artefacts import onnx_session

    session = onnx_session(Path(job["path"]), threads=job["threads"])
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: session.run(["logits"], {name: inputs[name] for name in names})[0]


def _slice(inputs: dict[str, np.ndarray], start: int, size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(inputs.values())))
    index = np.arange(start, start + size) % n
    return {k: np.ascontiguousarray(v[index]) for k, v in inputs.items()}


def _timed_calls(predict, inputs: dict[str, np.ndarray], batch: int, seconds: float, minimum: int) -> list[float]:
    times: list[float] = []
    started, i = time.perf_counter(), 0
    while len(times) < minimum or time.perf_counter() - started < seconds:
        chunk = _slice(inputs, i * batch, batch)
        begin = time.perf_counter()
        predict(chunk)
        times.append(time.perf_counter() - begin)
        i += 1
    return times


def run_worker(job: dict[str, Any]) -> None:
    """Load the model, score the held-out inputs, then answer the parent's commands one line at a time: ``latency``
    (one block of batch-1 calls), ``throughput`` (one block at batch :data:`THROUGHPUT_BATCH`) and ``exit``."""
    threads = int(job["threads"])
    # Every model's libraries are loaded before the baseline, so the rise to the peak is the model's own memory.
    for module in ("onnxruntime", "sklearn.ensemble", "transformers", "distill.models", "serving.artefacts"):
        importlib.import_module(module)
    import torch

    torch.set_num_threads(threads)
    peak_reset = _reset_peak()
    baseline = _rss_mib()
    loaded_at = time.perf_counter()
    predict = _predictor(job)
    load_seconds = time.perf_counter() - loaded_at
    with np.load(job["inputs"]) as archive:
        splits = {split: {k.split(".", 1)[1]: archive[k] for k in archive.files if k.startswith(f"{split}.")}
                  for split in ("test", "val")}
    logits = {}
    for split, inputs in splits.items():
        if inputs and job["score"]:
            n = len(next(iter(inputs.values())))
            logits[split] = np.concatenate([predict(_slice(inputs, i, min(256, n - i))) for i in range(0, n, 256)])
    np.savez(job["logits_out"], **logits)
    test = splits["test"]
    scale = QUICK_FACTOR if job.get("quick") else 1
    _timed_calls(predict, test, 1, WARM_UP_SECONDS / scale, 10)  # first calls allocate and pick kernels
    batch = int(job["throughput_batch"])
    predict(_slice(test, 0, batch))
    _reply({"load_seconds": load_seconds, "rss_after_imports_mib": baseline, "peak_reset": peak_reset})
    for command in sys.stdin:
        command = command.strip()
        # Each block follows other models' blocks, which evicted this one's caches: it warms up again, untimed.
        if command == "latency":
            _timed_calls(predict, test, 1, BLOCK_WARM_UP_SECONDS / scale, 3)
            _reply({"seconds": _timed_calls(predict, test, 1, LATENCY_BLOCK_SECONDS / scale,
                                            MIN_LATENCY_CALLS // LATENCY_BLOCKS)})
        elif command == "throughput":
            _timed_calls(predict, test, batch, BLOCK_WARM_UP_SECONDS / scale, 1)
            _reply({"seconds": _timed_calls(predict, test, batch, THROUGHPUT_BLOCK_SECONDS / scale, 2)})
        else:
            _reply({"peak_rss_mib": _peak_mib()})
            return


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------- the parent
class _Worker:
    """One model in its own process, measured a block at a time so that every model sees the same machine."""

    def __init__(self, job: dict[str, Any]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
        self.name = job["name"]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, "-m", "serving.bench", json.dumps(job)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.ready: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            self.process.wait(timeout=WORKER_TIMEOUT_S)
            self.stderr.seek(0)
            last = (self.stderr.read().strip().splitlines() or [""])[-1]
            from protocols.errors import ExternalToolError

            raise ExternalToolError(f"bench: measuring {self.name} failed (exit {self.process.returncode}): {last}")
        return json.loads(line)

    def wait_ready(self) -> None:
        """The worker's first line: it has loaded its model and scored the held-out inputs."""
        self.ready = self._read()

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        final = self.ask("exit")
        self.process.wait(timeout=60)
        self.stderr.close()
        return final

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def _measure_all(jobs: list[dict[str, Any]], progress) -> list[dict[str, Any]]:
    """Start every worker, then time them in turns: block k of every model before block k+1 of any."""
    workers: list[_Worker] = []
    try:
        progress(f"loading {len(jobs)} models, each in its own process")
        workers = [_Worker(job) for job in jobs]  # loaded side by side; timed one at a time below
        for worker in workers:
            worker.wait_ready()
        latency: list[list[list[float]]] = [[] for _ in workers]
        throughput: list[list[list[float]]] = [[] for _ in workers]
        for block in range(LATENCY_BLOCKS):
            progress(f"timing, block {block + 1} of {LATENCY_BLOCKS}")
            for i, worker in enumerate(workers):
                latency[i].append(worker.ask("latency")["seconds"])
                throughput[i].append(worker.ask("throughput")["seconds"])
        results = []
        for i, worker in enumerate(workers):
            calls, batches = np.concatenate(latency[i]), np.concatenate(throughput[i])
            results.append({**worker.ready, **worker.close(),
                            "latency_p50_ms": float(np.percentile(calls, 50) * 1e3),
                            "latency_p99_ms": float(np.percentile(calls, 99) * 1e3),
                            "latency_block_medians_ms": [float(np.median(b) * 1e3) for b in latency[i]],
                            "latency_calls": int(len(calls)),
                            "throughput_per_s": float(jobs[i]["throughput_batch"] * len(batches) / batches.sum()),
                            "throughput_block_per_s": [jobs[i]["throughput_batch"] * len(b) / sum(b)
                                                       for b in throughput[i]],
                            "throughput_calls": int(len(batches))})
        return results
    finally:
        for worker in workers:
            worker.kill()


def _size_bytes(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def teacher_path(run_dir: Path, given: Path | None) -> Path:
    from protocols.errors import ConfigError

    if given is not None:
        return Path(given)
    entries = sorted(p for p in (Path(run_dir) / "teacher").glob("*") if not p.name.startswith("."))
    if (Path(run_dir) / "teacher" / "fedistill_teacher.json").is_file():
        return Path(run_dir) / "teacher"
    if len(entries) == 1:
        return entries[0]
    raise ConfigError(f"--teacher is required: {Path(run_dir) / 'teacher'} does not hold exactly one teacher "
                      "(a deployed coordinator never holds the sites' teachers); pass the teacher to compare with.")


def teacher_size(path: Path, causal_teacher: Any | None) -> dict[str, Any]:
    """Parameters (or, for tree ensembles, tree nodes) and bytes on disk, an encoder a manifest points at included;
    ``causal_teacher``: a causal-LM teacher's model, already loaded."""
    from distill.models import TEACHER_MANIFEST, SklearnTeacher, count_parameters, load_teacher

    if causal_teacher is not None:
        from distill.causal_lm import parameter_counts

        counts = parameter_counts(causal_teacher)
        return {"parameters": counts.total, "non_embedding_parameters": counts.non_embedding,
                "parameters_measure": "parameters", "file_bytes": _size_bytes(path)}
    teacher = load_teacher(path)
    size = _size_bytes(path)
    manifest = Path(path) / TEACHER_MANIFEST
    if manifest.is_file():
        encoder = Path(json.loads(manifest.read_text())["encoder"])
        size += _size_bytes(encoder if encoder.is_absolute() else Path(path) / encoder)
    if isinstance(teacher, SklearnTeacher):
        predictors = getattr(teacher.estimator, "_predictors", None)
        nodes = sum(len(tree.nodes) for trees in predictors for tree in trees) if predictors else None
        return {"parameters": nodes, "parameters_measure": "tree nodes" if nodes else "n/a", "file_bytes": size}
    module = getattr(teacher, "module", None)
    return {"parameters": count_parameters(module) if module is not None else None,
            "parameters_measure": "parameters", "file_bytes": size}


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / float(np.median(values))


def _trust(measured: dict[str, Any]) -> list[str]:
    """Why a model's own timings cannot be trusted; empty when they can."""
    problems = []
    for key in ("latency_p50_ms", "latency_p99_ms", "throughput_per_s", "peak_rss_mib"):
        value = measured.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(f"{key} is {value!r}, not a positive number")
    medians = measured.get("latency_block_medians_ms") or []
    if medians and min(medians) > 0 and _spread(medians) > STABLE_SPREAD:
        problems.append(f"its batch-1 latency moved by {_spread(medians):.0%} between repeats (over "
                        f"{STABLE_SPREAD:.0%})")
    return problems


def _ratio_trust(row: dict[str, Any], teacher: dict[str, Any]) -> list[str]:
    """The speed ratios are taken block by block (both models timed in the same turn): they must agree."""
    ratios = [t / s for t, s in zip(teacher["latency_block_medians_ms"], row["latency_block_medians_ms"])
              if s > 0 and t > 0]
    if len(ratios) < LATENCY_BLOCKS or not all(math.isfinite(r) for r in ratios):
        return ["a latency block was empty or not positive"]
    if _spread(ratios) > STABLE_RATIO_SPREAD:
        return [f"its speed-up over the teacher moved by {_spread(ratios):.0%} between repeats (over "
                f"{STABLE_RATIO_SPREAD:.0%})"]
    return []


def _save_inputs(path: Path, test: dict[str, np.ndarray], validation) -> None:
    arrays = {f"test.{k}": v for k, v in test.items()}
    if validation is not None:
        arrays |= {f"val.{k}": v for k, v in validation.inputs.items()}
    np.savez(path, **arrays)


def _student_size(student) -> dict[str, Any]:
    from distill.models import count_parameters

    if student.family != "causal_lm":
        return {"parameters": count_parameters(student.model), "parameters_measure": "parameters"}
    from distill.causal_lm import merged_student, parameter_counts

    merged = merged_student(student.model)
    counts = parameter_counts(merged)
    with tempfile.TemporaryDirectory(prefix="fedistill-merged-") as folder:
        merged.save_pretrained(folder)  # the weights file a serving team loads (a tied embedding written once)
        size = _size_bytes(Path(folder) / "model.safetensors")
    return {"parameters": counts.total, "non_embedding_parameters": counts.non_embedding,
            "parameters_measure": "parameters", "merged_bytes": size}


def _classifier_quality(job: dict[str, Any], heldout) -> dict[str, Any]:
    from serving.artefacts import classifier_quality

    with np.load(job["logits_out"]) as saved:
        return classifier_quality(heldout, saved["test"], lambda: saved["val"] if "val" in saved.files else None)


def _causal_quality(student, heldout, kind: str, path: Path, teacher: Any) -> dict[str, Any]:
    """Held-out perplexity, computed here rather than in the worker: a causal LM's logits are [texts, length,
    vocabulary], too large to hand over."""
    from serving.artefacts import causal_quality, onnx_session

    if kind == "teacher":
        from distill.causal_train import score_tokens

        scores = score_tokens(teacher, heldout.test.inputs["input_ids"], heldout.test.inputs["attention_mask"], 8)
        return {"perplexity": scores.perplexity, "nll": float(scores.nll.mean()), "tokens": scores.tokens}
    return causal_quality(student, heldout.test.inputs, onnx_session(path) if kind == "onnx" else None)


def bench_run(run_dir: Path, inputs: Path | None = None, teacher: Path | None = None, threads: int = 1,
              quick: bool = False, progress=lambda step: None) -> dict[str, Any]:
    """Measure the teacher and every student form; returns the table's rows, ratios and the checks behind them."""
    from distill.causal_lm import load_causal_lm_teacher
    from protocols.errors import ConfigError
    from serving.artefacts import (ONNX_DIR, ONNX_FILES, causal_model_ids, check_heldout, export_onnx,
                                   finished_student, heldout_inputs, parity_inputs, quantize_int4, quantize_int8)

    run_dir = Path(run_dir)
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    student = finished_student(run_dir)
    heldout = heldout_inputs(run_dir, inputs)
    if heldout is None:
        raise ConfigError(f"--inputs is required: {run_dir} is a deployed run and its coordinator holds no held-out "
                          "records; pass an .npz with test.input.<name> and test.labels (and val.* for the "
                          "decision threshold).")
    check_heldout(student, heldout)
    source = teacher_path(run_dir, teacher)
    causal = student.family == "causal_lm"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedistill-bench-") as scratch:
        work = Path(scratch)
        teacher_inputs, student_inputs = work / "teacher-inputs.npz", work / "student-inputs.npz"
        _save_inputs(teacher_inputs, heldout.test.inputs, heldout.validation)
        _save_inputs(student_inputs, causal_model_ids(student, heldout.test.inputs) if causal else heldout.test.inputs,
                     None if causal else heldout.validation)
        progress("ONNX and quantized students")
        fp32 = work / ONNX_DIR / ONNX_FILES["fp32"]
        export_onnx(student, fp32, parity_inputs(student, heldout))
        quantize_int8(fp32, work / ONNX_DIR / ONNX_FILES["int8"])
        int4 = quantize_int4(fp32, work / ONNX_DIR / ONNX_FILES["int4"])
        student_size = _student_size(student)
        files = {"student, torch fp32": run_dir / "student" / "model.safetensors", "student, ONNX fp32": fp32,
                 "student, ONNX int8": work / ONNX_DIR / ONNX_FILES["int8"]}
        if int4.get("file"):
            files["student, ONNX int4"] = work / ONNX_DIR / ONNX_FILES["int4"]
        # A causal-LM teacher (Gemma: about 70 s to load and dequantize) is loaded here once, for its size and its
        # perplexity; its worker loads its own copy to be timed.
        causal_teacher = load_causal_lm_teacher(source).model if causal else None
        models = [("teacher", "teacher", source, teacher_size(source, causal_teacher))]
        models += [(name, "torch" if "torch" in name else "onnx", run_dir if "torch" in name else path,
                    {**student_size, "file_bytes": _size_bytes(path)}) for name, path in files.items()]
        if causal:  # the torch student's bytes: the merged weights a serving team loads, not the trainable tensors
            models[1][3]["file_bytes"] = student_size["merged_bytes"]
        headline = "perplexity" if causal else "roc_auc"
        jobs = [{"name": name, "kind": kind, "path": str(path), "family": student.family, "threads": threads,
                 "quick": quick, "score": not causal, "logits_out": str(work / f"logits-{i}.npz"),
                 "inputs": str(teacher_inputs if kind in ("teacher", "baseline") else student_inputs),
                 "throughput_batch": CAUSAL_THROUGHPUT_BATCH if causal else THROUGHPUT_BATCH}
                for i, (name, kind, path, _) in enumerate([("baseline", "baseline", "", None), *models])]
        baseline, *measurements = _measure_all(jobs, progress)
        progress("held-out quality")
        rows = []
        for (name, kind, path, size), measured, job in zip(models, measurements, jobs[1:]):
            quality = (_causal_quality(student, heldout, kind, path, causal_teacher) if causal
                       else _classifier_quality(job, heldout))
            # The model's own memory: its peak over the imports, less what a worker without a model adds.
            rise = measured["peak_rss_mib"] - measured["rss_after_imports_mib"]
            baseline_rise = baseline["peak_rss_mib"] - baseline["rss_after_imports_mib"]
            memory = []
            if rise < baseline_rise:
                memory.append(f"its memory over the imports ({rise:.1f} MiB) is below a worker without a model's "
                                f"({baseline_rise:.1f} MiB): the model's own memory is below what this resolves")
            rows.append({"model": name, "file": Path(path).name if kind != "torch" else "student/model.safetensors",
                         **size, **measured, "model_peak_mib": rise - baseline_rise if rise >= baseline_rise else None,
                         "memory_untrustworthy": memory, "quality": quality, "headline": quality.get(headline),
                         "untrustworthy": _trust(measured)})
        tokens = float(heldout.test.inputs["attention_mask"].sum(axis=1).mean()) if causal else None
    load_after = os.getloadavg()
    teacher_row = rows[0]
    for row in rows:
        row["ratio_untrustworthy"] = _ratio_trust(row, teacher_row)
        row["x_faster_batch1"] = float(np.median([t / s for t, s in zip(teacher_row["latency_block_medians_ms"],
                                                                       row["latency_block_medians_ms"])]))
        row["x_throughput"] = row["throughput_per_s"] / teacher_row["throughput_per_s"]
        row["size_ratio"] = row["file_bytes"] / teacher_row["file_bytes"]
        if row["headline"] is None or not teacher_row["headline"]:
            row["quality_share"] = None
        else:  # perplexity: lower is better, so the teacher's over the student's
            row["quality_share"] = (teacher_row["headline"] / row["headline"] if causal
                                    else row["headline"] / teacher_row["headline"])
        if causal:
            row["tokens_per_s"] = row["throughput_per_s"] * tokens
            row["latency_per_token_ms"] = row["latency_p50_ms"] / tokens
        row["headline_change_vs_fp32"] = (row["headline"] - rows[1]["headline"]
                                          if row["headline"] is not None and rows[1]["headline"] is not None else None)
    cores = os.cpu_count() or 1
    return {"schema_version": SCHEMA_VERSION, "run_id": student.run_id, "family": student.family,
            "headline_metric": headline, "lower_is_better": causal, "heldout": heldout.source, "threads": threads,
            "quick": quick, "throughput_batch": CAUSAL_THROUGHPUT_BATCH if causal else THROUGHPUT_BATCH,
            "throughput_unit": "sequences/s (tokens/s in tokens_per_s)" if causal else "records/s",
            "real_tokens_per_sequence": tokens, "machine": {"cpus": cores, "load_average_before": load_before,
                                                              "load_average_after": load_after,
                                                              "busy": max(load_before[0], load_after[0]) > cores},
            "baseline_peak_rss_mib": baseline["peak_rss_mib"], "int4": int4, "rows": rows}


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
