"""Table 2's rows over several training seeds, with any other ``hypseg train`` options.

Usage (from the repository root, in the venv)::

    python benchmarks/ablation.py --data ./data --seeds 0,1,2         # train's defaults, 5 min each
    python benchmarks/ablation.py --data ./data --steps 2000 --seeds 0,1 \\
        --train-args="--texture-weight 0 --beta 8"                      # the paper's own loss
    python benchmarks/ablation.py --quick                               # tiny data, a few minutes

``benchmarks/paper_tables.py`` trains one seed per ablation row (its budget); this
script trains every row of Table 2 (Euclidean base, Euclidean + triplet,
hyperbolic base, + gyroconv, + triplet, + gyroconv & triplet) with each of
``--seeds``, for ``--minutes`` of wall-clock time or a fixed ``--steps`` (which
does not depend on what else the machine runs), adding ``--train-args`` to every
``hypseg train``; clusters ``--split`` at k = 2, 4, 8 with all of ``hypseg
cluster``'s spatial steps and without them (``--smooth 0 --snap 0 --mrf 0 --nest
0``, the paper's protocol), as ``--parts`` batch parts at once, each with its share
of the cores (default 2 on 2 cores, as the benchmark does: k-means uses one core well
and two poorly; the labels are the same either way); and scores them with ``hypseg
evaluate`` (mean Hungarian-matched Dice). It drives the command line only. It prints
a table of each row's mean and standard deviation over the seeds, and the ablation's
differences of row means (those whose two rows were measured), each marked "beyond"
when larger in magnitude than the larger seed standard deviation of the two rows and
twice the standard error of the difference of the means (sqrt(sd_a^2/n + sd_b^2/n)), as
``benchmarks/results/ablation_seeds.md`` does; then the same comparisons seed by seed
(a seed fixes the initialisation and the sampling stream of every row): the mean ±
standard deviation of the per-seed differences and how many seeds of the row came
out ahead.

Nothing is written into the repository; results go to ``--workdir``, where a rerun
reuses each row and seed finished with the same commands and the same hypseg code
(the tag of its files hashes both: the commands, and the sources of the ``hypsegcli``
package that ``python -m hypsegcli`` runs), so an interrupted run is resumed by
running it again, and results of other code are measured again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import paper_tables

HYPSEG = tuple(paper_tables.HYPSEG)
#: paper_tables.py's Table 2 rows by the names used here
NAMES = {
    "euclid_base": "Euclidean base",
    "euclid_triplet": "Euclidean + triplet",
    "hyp_base": "hyperbolic base",
    "hyp_gyro": "+ gyroconv",
    "hyp_triplet": "+ triplet",
    "hyp_full": "+ gyroconv & triplet",
}
#: Table 2's rows: their ``hypseg train`` switches, as the benchmark trains them
ROWS = {NAMES[key]: tuple(flags) for key, _, _, flags in paper_tables.ROWS}
#: the two clusterings scored: all of ``hypseg cluster``'s spatial steps, and none
MODES = ("all", "raw")
#: (name, row, its reference): the ablation's comparisons, row minus reference
COMPARISONS = (
    ("hyperbolic base - Euclidean base", "hyperbolic base", "Euclidean base"),
    ("hyperbolic + triplet - Euclidean + triplet", "+ triplet", "Euclidean + triplet"),
    ("+ gyroconv - hyperbolic base", "+ gyroconv", "hyperbolic base"),
    ("+ triplet - hyperbolic base", "+ triplet", "hyperbolic base"),
    ("+ gyroconv & triplet - + triplet", "+ gyroconv & triplet", "+ triplet"),
)


def hypseg(command: tuple[str, ...], *args: str, log: Path) -> str:
    """Run one hypseg command line (``command`` + ``args``); its stdout, stderr to ``log``."""
    with log.open("a") as err:
        done = subprocess.run(
            [*command, *args], stdout=subprocess.PIPE, stderr=err, text=True, check=False
        )
    if done.returncode != 0:
        sys.exit(f"{Path(sys.argv[0]).name}: {' '.join(args[:2])} failed; see {log}")
    return done.stdout


def code_digest() -> str:
    """Short sha256 of the sources of the ``hypsegcli`` package that ``python -m hypsegcli``
    runs from here (found as that command finds it: the working directory first)."""
    found = subprocess.run(
        [sys.executable, "-c", "import hypsegcli, os; print(os.path.dirname(hypsegcli.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    )
    folder = Path(found.stdout.strip())
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower()


def measure(
    rows: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
    seeds: list[int],
    *,
    data: Path,
    work: Path,
    split: str,
    budget: tuple[str, ...],
    cluster_args: tuple[str, ...] = (),
    parts: int = 1,
    code: str = "",
) -> dict[tuple[str, int], dict]:
    """Train, cluster and score every row x seed; ``rows`` maps a name to (the command
    that runs ``hypseg``, its ``train`` switches). A row and seed finished before with
    the same commands and ``code`` (:func:`code_digest`; both hashed into the tag of its
    files in ``work``) is read back."""
    results: dict[tuple[str, int], dict] = {}
    threads = str(max(1, (os.cpu_count() or 1) // parts))
    for name, (command, switches) in rows.items():
        for seed in seeds:
            what = [command, switches, seed, budget, split, cluster_args, str(data), code]
            digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:10]
            tag = f"{_slug(name)}_s{seed}_{digest}"
            done = work / f"{tag}.json"
            if done.exists():
                results[(name, seed)] = json.loads(done.read_text())
                print(f"{name}, seed {seed}: measured before ({done})", file=sys.stderr)
                continue
            log = work / f"{tag}.log"
            model = work / f"{tag}.pt"
            train = json.loads(
                hypseg(
                    command,
                    *("train", str(data / "train" / "images"), "-o", str(model)),
                    *budget,
                    *("--seed", str(seed), "--overwrite", "--json"),
                    *switches,
                    log=log,
                )
            )
            row: dict = {"steps": train["step"], "seconds": train["elapsed_seconds"]}
            for mode, extra in (("all", ()), ("raw", paper_tables.NO_SPATIAL)):
                seg = work / f"{tag}_{mode}"
                argv = [
                    *("cluster", str(data / split / "images"), "-m", str(model)),
                    *paper_tables.KS,
                    *("-o", str(seg), "--cache-dir", str(work / f"{tag}_cache"), "--overwrite"),
                    *cluster_args,
                    *extra,
                ]
                if parts > 1:  # batch parts at once, each with its share of the cores
                    with log.open("a") as err:
                        procs = [
                            subprocess.Popen(
                                [*command, *argv, "--num-parts", str(parts), "--part-id", str(i)]
                                + ["--threads", threads],
                                stdout=subprocess.DEVNULL,
                                stderr=err,
                            )
                            for i in range(parts)
                        ]
                        if [proc.wait() for proc in procs] != [0] * parts:
                            sys.exit(f"{Path(sys.argv[0]).name}: cluster failed; see {log}")
                else:
                    hypseg(command, *argv, log=log)
                report = json.loads(
                    hypseg(
                        HYPSEG,
                        *("evaluate", str(seg), str(data / split / "labels")),
                        *("--no-hausdorff", "--json"),
                        log=log,
                    )
                )
                row[mode] = [float(s["mean_dice"]) for s in report["summary"]]
            done.write_text(json.dumps(row))
            results[(name, seed)] = row
            print(
                f"{name}, seed {seed}: {row['steps']} steps, all {fmt(row['all'])}, "
                f"raw {fmt(row['raw'])}",
                file=sys.stderr,
            )
    return results


def fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def table(names: list[str], seeds: list[int], results: dict) -> list[str]:
    """Markdown rows: mean (± std over seeds) per level, with and without spatial steps."""
    lines = ["| row | steps | all spatial steps | no spatial step |", "| --- | --- | --- | --- |"]
    for name in names:
        rows = [results[(name, s)] for s in seeds]
        cells = []
        for mode in MODES:
            per_level = list(zip(*(r[mode] for r in rows), strict=True))
            cells.append(
                " / ".join(
                    f"{statistics.fmean(v):.3f}"
                    + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")
                    for v in per_level
                )
            )
        steps = statistics.fmean(r["steps"] for r in rows)
        lines.append(f"| {name} | {steps:.0f} | {cells[0]} | {cells[1]} |")
    return lines


def _comparisons(names: list[str], title: str, cell) -> list[str]:
    """A Markdown table of the comparisons between rows of ``names``: ``cell(a, b, mode,
    level)`` gives each level's text, with and without the spatial steps."""
    lines = [
        f"| {title} | all spatial steps L1 / L2 / L3 | no spatial step L1 / L2 / L3 |",
        "| --- | --- | --- |",
    ]
    for label, a, b in COMPARISONS:
        if a in names and b in names:
            cells = [" / ".join(cell(a, b, mode, lvl) for lvl in range(3)) for mode in MODES]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return lines


def differences(seeds: list[int], results: dict, names: list[str]) -> list[str]:
    """The ablation's comparisons between rows of ``names``: differences of row means,
    "beyond" where larger in magnitude than both the larger seed std of the two rows and
    twice the standard error of the difference of the means (needs at least 2 seeds)."""
    n = len(seeds)

    def cell(a: str, b: str, mode: str, lvl: int) -> str:
        va = [results[(a, s)][mode][lvl] for s in seeds]
        vb = [results[(b, s)][mode][lvl] for s in seeds]
        diff = statistics.fmean(va) - statistics.fmean(vb)
        text = f"{diff:+.3f}" if abs(diff) >= 0.001 else f"{diff:+.4f}"
        if n > 1:
            sa, sb = statistics.stdev(va), statistics.stdev(vb)
            need = max(sa, sb, 2 * math.sqrt(sa**2 / n + sb**2 / n))
            text += " (beyond)" if abs(diff) > need else ""
        return text

    return _comparisons(names, "comparison", cell)


def paired(seeds: list[int], results: dict, names: list[str]) -> list[str]:
    """The comparisons of :func:`differences` seed by seed: mean ± std of the per-seed
    differences and the number of seeds where the row is ahead, per level."""

    def cell(a: str, b: str, mode: str, lvl: int) -> str:
        d = [results[(a, s)][mode][lvl] - results[(b, s)][mode][lvl] for s in seeds]
        ahead = sum(x > 0 for x in d)
        return f"{statistics.fmean(d):+.3f} ± {statistics.stdev(d):.3f} ({ahead}/{len(d)})"

    return _comparisons(names, "comparison, seed by seed", cell)


def seeds_and_rows(
    parser: argparse.ArgumentParser, args: argparse.Namespace, known: dict
) -> tuple[list[int], list[str]]:
    """``--seeds`` and ``--rows`` as lists; an unknown row is a usage error."""
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in names if r not in known]
    if unknown:
        parser.error(f"unknown row(s): {', '.join(unknown)}")
    return seeds, names


def data_folder(parser: argparse.ArgumentParser, args: argparse.Namespace, work: Path) -> Path:
    """``--data``, checked; without it, ``hypseg synth`` data in ``work``: 12 volumes of
    24^3 with ``--quick``, else the benchmark's 120 of 50^3 (split 80/20/20, seed 0)."""
    data = args.data
    if data is None:
        data = work / "data"
        n, size, split = (12, 24, "8/2/2") if args.quick else (120, 50, "80/20/20")
        cmd = ["synth", str(data), "--n", str(n), "--size", str(size)]
        hypseg(HYPSEG, *cmd, "--seed", "0", "--split", split, log=work / "synth.log")
    elif not (data / "train" / "images").is_dir() or not (data / args.split).is_dir():
        parser.error(f"{data}: should hold train/images and {args.split}/ (hypseg synth --split)")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a hypseg synth folder with train/ and --split")
    parser.add_argument("--split", default="val", help="the split clustered and scored")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=5.0, help="training per model")
    budget.add_argument("--steps", type=int, help="train a fixed number of steps instead")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, e.g. 0,1,2")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}"
    )
    parser.add_argument(
        "--train-args", default="", help="more hypseg train options, e.g. '--texture-weight 0'"
    )
    parser.add_argument(
        "--cluster-args", default="", help="more hypseg cluster options, e.g. '--stride 2'"
    )
    parser.add_argument(
        "--parts",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="run each hypseg cluster as this many batch parts at once (default 2 on 2 cores)",
    )
    parser.add_argument("--workdir", type=Path, help="results and models (default: temporary)")
    parser.add_argument(
        "--quick", action="store_true", help="synthesise 12 volumes of 24^3, 20 steps per model"
    )
    args = parser.parse_args()
    seeds, names = seeds_and_rows(parser, args, ROWS)
    if args.quick:
        args.steps, args.minutes = 20, None
    train_args = tuple(shlex.split(args.train_args))
    plan = {name: (HYPSEG, (*ROWS[name], *train_args)) for name in names}
    train_budget = (
        ("--steps", str(args.steps)) if args.steps else ("--max-minutes", str(args.minutes))
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = data_folder(parser, args, work)
        results = measure(
            plan,
            seeds,
            data=data,
            work=work,
            split=args.split,
            budget=train_budget,
            cluster_args=tuple(shlex.split(args.cluster_args)),
            parts=args.parts,
            code=code_digest(),
        )
    print(
        f"Table 2 rows on the {args.split} split, {' '.join(train_budget)} per model"
        + (f", train options {' '.join(train_args)}" if train_args else "")
        + f", seeds {', '.join(map(str, seeds))}. Mean Dice L1 / L2 / L3 "
        "(mean over seeds; ± std over seeds where there are several)."
    )
    print()
    print("\n".join(table(names, seeds, results)))
    if any(a in names and b in names for _, a, b in COMPARISONS):
        print()
        print("\n".join(differences(seeds, results, names)))
        if len(seeds) > 1:
            print()
            print("\n".join(paired(seeds, results, names)))


if __name__ == "__main__":
    main()
