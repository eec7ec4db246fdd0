"""How a federation scales with the number of sites: wall time per round, peak memory, SecAgg+'s overhead.

For each number of sites (10, 50, 100 and 500 by default) it runs ``fedistill simulate --scenario banks --sites N``
as a user would (one process tree: the CLI, Ray's daemons and its site actors), with DP-SGD at epsilon 8 per bank
and SecAgg+, and again with plain aggregation (``--no-secure-aggregation``), everything else equal. It reports:

- the command's wall time (set-up, rounds, baselines, the sites' final evaluation, summary);
- the round time: the coordinator's own ``seconds`` of each round record (query to checkpoint). Round 1 also pays
  for the site actors' start-up, teacher caches and noise calibration, so it is reported apart from the median of
  the later rounds;
- the peak memory of the whole process tree: the sum of every process's proportional set size (PSS, so pages
  Ray's workers share are counted once), sampled every 0.25 s;
- the SecAgg+ overhead ratio: SecAgg+ time over plain time, for the command and for the later rounds.

Every figure is checked before it prints: times positive, a round time that is not a median of at least one later
round is marked, memory above the sampler's floor (the CLI alone), and the machine's load average before and after
is printed, because on a busy 2-core machine every figure here moves with the load. A failed check prints the
figure as "untrustworthy" with the reason.

    .venv/bin/python benchmarks/scale.py                                    # 10, 50, 100, 500 sites
    .venv/bin/python benchmarks/scale.py --sites 100 --rounds 3 --json scale.json
    .venv/bin/python benchmarks/scale.py --quick                            # smoke: 10 sites, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
FEDISTILL = Path(sys.executable).with_name("fedistill")
SAMPLE_EVERY_S = 0.25


class TreeMemory:
    """The peak of the summed PSS of a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:
                    continue  # a process that ended between the listing and the read
            self.peak_bytes = max(self.peak_bytes, total)
            self.samples += 1
            self._stop.wait(SAMPLE_EVERY_S)


def run_once(sites: int, rounds: int, secure: bool, out: Path, extra: list[str]) -> dict[str, Any]:
    command = [str(FEDISTILL), "simulate", "--scenario", "banks", "--sites", str(sites), "--rounds", str(rounds),
               "--out", str(out), "--format", "json", *extra]
    if not secure:
        command.append("--no-secure-aggregation")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        with TreeMemory(process.pid) as memory:
            stdout, _ = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); see {out.with_suffix('.log')}")
    summary = json.loads(stdout)
    run_dir = Path(summary["paths"]["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [float(r["seconds"]) for r in records]
    return {"sites": sites, "rounds": rounds, "secure_aggregation": secure, "wall_s": wall,
            "round_1_s": seconds[0], "later_rounds_s": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
            "round_s": seconds, "participants": [len(r.get("participants", [])) for r in records],
            "peak_pss_bytes": memory.peak_bytes, "memory_samples": memory.samples, "run_dir": str(run_dir)}


def checked(value: float | None, floor: float, what: str) -> tuple[str, str | None]:
    """The figure as text, and why it is untrustworthy (None when it passed its checks)."""
    if value is None:
        return "n/a", f"{what}: no later round to take a median of"
    if not value > floor:
        return "untrustworthy", f"{what}: {value:.3g} is not above {floor:.3g}"
    return f"{value:.3g}", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100, 500])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (500 sites and more: 2)")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each size without SecAgg+, for the overhead ratio")
    parser.add_argument("--quick", action="store_true", help="10 sites, 2 rounds")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args()
    sizes, rounds = ([10], 2) if args.quick else (args.sites, args.rounds)
    load_before = os.getloadavg()
    floor = psutil.Process().memory_info().rss  # this script alone: a tree below it was not sampled
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        base = args.keep or Path(scratch)
        for sites in sizes:
            for secure in (True, False) if args.plain else (True,):
                run_rounds = rounds if sites < 500 else min(rounds, 2)
                out = base / f"sites{sites}-{'secagg' if secure else 'plain'}"
                print(f"running {sites} sites x {run_rounds} rounds, {'SecAgg+' if secure else 'plain'} ...",
                      file=sys.stderr, flush=True)
                results.append(run_once(sites, run_rounds, secure, out, []))
    load_after = os.getloadavg()
    problems: list[str] = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("| sites | rounds | aggregation | command s | round 1 s | later rounds s (median) | peak memory GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        cells = []
        for value, low, what in ((r["wall_s"], 0.0, "command time"), (r["round_1_s"], 0.0, "round 1"),
                                 (r["later_rounds_s"], 0.0, "later rounds"),
                                 (r["peak_pss_bytes"] / 2**30, floor / 2**30, "peak memory")):
            text, problem = checked(value, low, f"{r['sites']} sites {what}")
            cells.append(text)
            if problem:
                problems.append(problem)
        print(f"| {r['sites']} | {r['rounds']} | {'SecAgg+' if r['secure_aggregation'] else 'plain'} | "
              + " | ".join(cells) + " |")
    if args.plain:
        print("\n| sites | SecAgg+ / plain, command | SecAgg+ / plain, later rounds |")
        print("|---|---|---|")
        for secure, plain in zip(results[::2], results[1::2]):
            command = secure["wall_s"] / plain["wall_s"]
            later = (secure["later_rounds_s"] / plain["later_rounds_s"]
                     if secure["later_rounds_s"] and plain["later_rounds_s"] else None)
            cells = []
            for value, what in ((command, "command ratio"), (later, "later-round ratio")):
                text, problem = checked(value, 0.0, f"{secure['sites']} sites {what}")
                cells.append(text)
                if problem:
                    problems.append(problem)
            print(f"| {secure['sites']} | " + " | ".join(cells) + " |")
    for problem in problems:
        print(f"untrustworthy: {problem}")
    if args.json:
        args.json.write_text(json.dumps({"load_average": {"before": load_before, "after": load_after},
                                         "results": results, "untrustworthy": problems}, indent=2) + "\n")


if __name__ == "__main__":
    main()
