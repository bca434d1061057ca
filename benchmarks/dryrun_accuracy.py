"""How close ``--dry-run``'s estimates come to the runs they describe.

For each volume side (default 32, 64, 96, 128: one ``hypseg synth`` volume
each) this drives the CLI only, one process per run, and compares what
``--dry-run --json`` said with what the same command then did:

- ``embed`` (every voxel, with --model or a 3-step default model): the estimated seconds against
  the run's ``embed`` stage, the estimated peak memory against the process's
  peak resident memory (``wait4``'s ``ru_maxrss``);
- ``cluster --k 2 --k 4 --k 8`` on the cached embeddings, one run per case:
  no spatial step (k-means fits and assignments), the same again with the
  fits cached (assignments only), Euclidean k-means (``--metric euclidean``,
  scikit-learn, its import included), then each spatial step alone on the cached
  hyperbolic fits (Potts prior, edge snap, intensity MRF, speck removal), and last the
  defaults (all steps and the nesting, whose fits are new). Seconds: the
  run's ``cluster`` stage (reading, loading embeddings and writing are not
  estimated and not counted).

Then, per component, the constant that would have made the estimate exact
(in the units of ``hypsegcli/batch.py``), so the constants can be set from
measurements rather than guessed; and the range of estimated / actual over
all runs.

Run: python benchmarks/dryrun_accuracy.py [--sides 32 64 96 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypsegcli.batch import ENCODER_EFFICIENCY, REFERENCE_RATE, estimate_kmeans_seconds
from hypsegcli.kmeans import _RESTART_SAMPLES

NO_STEPS = ["--smooth", "0", "--snap", "0", "--mrf", "0", "--nest", "0"]
#: (label, options) in the order they run: the second and later reuse the first's fits
CASES = [
    ("k-means, no spatial step", NO_STEPS),
    ("assignment only (fits cached)", NO_STEPS),
    (
        "Euclidean k-means (--metric euclidean), no spatial step",
        [*NO_STEPS, "--metric", "euclidean"],
    ),
    ("Potts prior (--smooth 0.8)", ["--snap", "0", "--mrf", "0", "--nest", "0"]),
    ("edge snap (--snap 2)", ["--smooth", "0", "--mrf", "0", "--nest", "0"]),
    ("intensity MRF (--mrf 0.5)", ["--smooth", "0", "--snap", "0", "--nest", "0"]),
    ("speck removal (--min-size 50)", [*NO_STEPS, "--min-size", "50"]),
    ("defaults (all steps, nesting)", []),
]
KS = ["--k", "2", "--k", "4", "--k", "8"]
FITTING = {CASES[0][0], CASES[2][0]}  # the runs that fit every k anew


def run_measured(args: list[str], threads: int | None) -> tuple[dict, float]:
    """Run ``hypseg ARGS --json``: its JSON and this child's own peak resident bytes."""
    argv = [sys.executable, "-m", "hypsegcli", *args, "--json"]
    argv += [] if threads is None else ["--threads", str(threads)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise SystemExit(f"hypseg {' '.join(args)} failed ({code}): {err.read().strip()}")
        return json.loads(out.read()), float(usage.ru_maxrss * 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 64, 96, 128])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a trained model file (default: 3 steps of the default architecture; the "
        "k-means fits' iterations, and so their time, depend on the embeddings)",
    )
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):  # its caches would turn the runs measured into lookups
        raise SystemExit(f"{work}: not empty; give a new --workdir")
    print(f"threads: {args.threads}; load average (1 min) before: {os.getloadavg()[0]:.2f}")
    # without --model: a few steps of the default architecture (its cost, not its weights)
    sides = sorted(set(args.sides))
    for side in sides:
        run_measured(["synth", str(work / f"d{side}"), "--n", "1", "--size", str(side)], None)
    model = args.model
    if model is None:
        model = work / "model.pt"
        run_measured(
            ["train", str(work / f"d{sides[0]}" / "images"), "-o", str(model), "--steps", "3"],
            args.threads,
        )

    # scikit-learn's import in a process that has torch and scipy already (as hypseg's has)
    probe = (
        "import time, torch, scipy.ndimage; t = time.perf_counter(); import sklearn.cluster; "
        "print(time.perf_counter() - t)"
    )
    sklearn_import = float(subprocess.check_output([sys.executable, "-c", probe], text=True))
    print(f"scikit-learn import: {sklearn_import:.2f} s")
    rows: list[tuple[int, str, float, float, float, float]] = []
    implied: dict[str, list[float]] = {}
    for side in sides:
        images = str(work / f"d{side}" / "images")
        cache = str(work / f"cache{side}")
        common = ["-m", str(model), "--cache-dir", cache]
        plan, _ = run_measured(["embed", images, *common, "--dry-run"], args.threads)
        done, rss = run_measured(["embed", images, *common], args.threads)
        est = plan["volumes"][0]
        assert est["state"] == "compute" and done["computed"] == 1, "embedding not computed"
        actual = done["volumes"][0]["stages"]["embed"]
        rows.append((side, "embed", plan["estimated_seconds"], actual, est["peak_bytes"], rss))
        rate = plan["flop_rate"]
        voxels = est["voxels"]
        flops = plan["flops_per_voxel"] * voxels
        # the encoder's share of the matmul rate it reached, the estimate's tile overheads
        # (its seconds beyond the FLOP term) taken out
        overhead = plan["estimated_seconds"] - flops / (rate * ENCODER_EFFICIENCY)
        implied.setdefault("ENCODER_EFFICIENCY", []).append(
            flops / (rate * max(actual - overhead, 1e-9))
        )
        seen: dict[str, float] = {}
        rates: list[float] = []
        for label, options in CASES:
            out = str(work / f"seg{side}")
            argv = ["cluster", images, *common, *KS, "-o", out, "--overwrite", *options]
            plan, _ = run_measured([*argv, "--dry-run"], args.threads)
            done, rss = run_measured(argv, args.threads)
            est = plan["volumes"][0]
            if label in FITTING:  # their fits are what the run measures
                assert est["fits"] == [2, 4, 8], f"{label}: fits found in the cache"
            actual = done["volumes"][0]["stages"]["cluster"]
            seen[label] = actual
            n_init = int(plan["config"]["n_init"])
            select = plan["config"]["select"]
            rates.append(plan["flop_rate"])
            rows.append((side, label, plan["estimated_seconds"], actual, est["peak_bytes"], rss))
        assign = seen["assignment only (fits cached)"]
        scale = sorted(rates)[len(rates) // 2] / REFERENCE_RATE  # the constants' unit
        ksum = 2 + 4 + 8
        implied.setdefault("KMEANS_ASSIGN_S (s per voxel x k)", []).append(
            assign / (voxels * ksum) * scale
        )
        fitted = min(voxels, 200_000)
        passes = n_init * min(fitted, _RESTART_SAMPLES) + fitted
        # the silhouette's estimate (seconds at this rate) is taken out first: the
        # estimate with the run's --select less the same without it
        sil = {}
        for line in (False, True):
            kw = dict(n_init=n_init, fit_samples=200_000, flop_rate=scale * REFERENCE_RATE)
            with_it = estimate_kmeans_seconds(
                voxels, [2, 4, 8], select=select, euclidean=line, **kw
            )
            sil[line] = with_it - estimate_kmeans_seconds(voxels, [2, 4, 8], euclidean=line, **kw)
        implied.setdefault("KMEANS_FIT_S (s per point of each pass x k)", []).append(
            (seen["k-means, no spatial step"] - assign - sil[False]) / (passes * ksum) * scale
        )
        euclidean = seen["Euclidean k-means (--metric euclidean), no spatial step"]
        implied.setdefault("SKLEARN_FIT_S (s per restart x fitted point x k)", []).append(
            (euclidean - sklearn_import - assign - sil[True]) / (n_init * fitted * ksum) * scale
        )
        implied.setdefault("SMOOTH_S (s per voxel x k)", []).append(
            (seen["Potts prior (--smooth 0.8)"] - assign) / (voxels * ksum) * scale
        )
        implied.setdefault("snap (s per voxel, k = 2, 4, 8 summed)", []).append(
            (seen["edge snap (--snap 2)"] - assign) / voxels
        )
        implied.setdefault("MRF (s per voxel, k = 2, 4, 8 summed)", []).append(
            (seen["intensity MRF (--mrf 0.5)"] - assign) / voxels
        )
        implied.setdefault("MIN_SIZE_S (s per voxel x number of k)", []).append(
            (seen["speck removal (--min-size 50)"] - assign) / (voxels * 3)
        )
        print(
            f"side {side} done: matmul rate {min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f} GFLOP/s, "
            f"load average {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
        )

    print(f"model: {model if args.model else 'a 3-step default model trained here'}")
    print(f"matmul rate measured by the last embed --dry-run (512^2): {rate / 1e9:.0f} GFLOP/s")
    print()
    print(
        "| side | run | estimated s | actual s | est/actual | estimated MB | peak MB | est/actual |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for side, label, es, a, em, m in rows:
        print(
            f"| {side} | {label} | {es:.2f} | {a:.2f} | {es / max(a, 1e-9):.2f} "
            f"| {em / 1e6:.0f} | {m / 1e6:.0f} | {em / m:.2f} |"
        )
    print()
    print("Constants that would have made each side's estimate exact:")
    for name, values in implied.items():
        print(f"  {name}: " + ", ".join(f"{v:.3g}" for v in values))
    time_ratios = [es / max(a, 1e-9) for _, _, es, a, _, _ in rows]
    # runs shorter than 0.2 s are mostly fixed costs the estimates leave out (as README counts)
    timed = [es / a for _, _, es, a, _, _ in rows if a >= 0.2]
    mem_ratios = [em / m for _, _, _, _, em, m in rows]
    print()
    print(f"estimated / actual seconds: {min(time_ratios):.2f} - {max(time_ratios):.2f}")
    if timed:
        print(f"  runs of 0.2 s or more: {min(timed):.2f} - {max(timed):.2f}")
    print(f"estimated / actual peak memory: {min(mem_ratios):.2f} - {max(mem_ratios):.2f}")
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
