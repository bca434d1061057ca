"""Wall time and peak memory of ``hypseg embed`` and ``hypseg cluster`` as volumes grow.

Usage (from the repository root, in the venv)::

    python benchmarks/scale.py                        # 64^3, 128^3, 256^3, mri, tomo at stride 1 and 2
    python benchmarks/scale.py --quick                # 64^3 and 128^3 only (3-4 minutes on 2 cores)
    python benchmarks/scale.py --sizes 64,128,mri --strides 2
    python benchmarks/scale.py --sizes 96x80x40 --model model.pt --keep work/

Cases: ``N`` is an N^3 MRC volume, ``XxYxZ`` any MRC box, ``tomo`` a 512x512x300
MRC tomogram and ``mri`` a 240x240x155 NIfTI (``.nii.gz``) MRI. Volumes are
smooth random noise (a coarse Gaussian field, linearly upsampled, plus voxel
noise) written before anything is timed. The model is ``--model`` or, by
default, a tiny one trained here (``hypseg synth`` 4 volumes of 40^3, then
``hypseg train --steps 20``, default model config), so the normalisation is
realistic; its weights do not change the cost.

For every case and stride, two commands run, each in a fresh child process
(so peaks never mix): ``hypseg embed VOL --stride S`` into an empty cache
(the encoder runs), then ``hypseg cluster VOL --stride S --k 2 --k 4 --k 8
--preview`` reading that cache entry (memory-mapped; k-means fit on a
subsample, labels assigned in chunks, label volumes and previews written).
Wall time is the child's; peak memory is its maximum resident set
(``ru_maxrss`` from ``os.wait4``, so only that child counts), which includes
the pages of a memory-mapped cache entry it touched. voxels/s counts every
voxel of the volume (also those interpolated at stride 2).

Writes its report after every command, so that a long run leaves a partial
table, and prints it at the end: to ``benchmarks/results/scale.md`` for the
default run; with ``--quick``, ``--sizes``, ``--strides``, ``--model`` or
``--no-preview`` to ``hypseg-scale.md`` in the system's temporary folder, so
that such a run does not replace the committed results; or to ``--out``. Raw
numbers go to the ``.json`` beside it. The report holds the table, the load
average before and after each command (the machine may be shared: times are
noisy) and, per command and stride, the slope of log time against log
voxels over the cases run (1 = linear).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOMO = (512, 512, 300)
MRI = (240, 240, 155)
DEFAULT_SIZES = "64,128,256,mri,tomo"
QUICK_SIZES = "64,128"
KS = (2, 4, 8)


@dataclass
class Case:
    name: str
    shape: tuple[int, int, int]
    fmt: str  # "mrc" or "nifti"

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def filename(self) -> str:
        return f"{self.name}.mrc" if self.fmt == "mrc" else f"{self.name}.nii.gz"


@dataclass
class Result:
    case: str
    shape: tuple[int, int, int]
    stride: int
    command: str
    seconds: float
    peak_bytes: int
    returncode: int
    load_before: float
    load_after: float
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


def parse_sizes(text: str) -> list[Case]:
    cases = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        if item == "tomo":
            cases.append(Case("tomo_512x512x300", TOMO, "mrc"))
        elif item == "mri":
            cases.append(Case("mri_240x240x155", MRI, "nifti"))
        elif "x" in item:
            shape = tuple(int(v) for v in item.split("x"))
            if len(shape) != 3 or min(shape) < 8:
                raise SystemExit(f"--sizes {item!r}: expected XxYxZ with sides >= 8")
            cases.append(Case(f"box_{item}", shape, "mrc"))  # type: ignore[arg-type]
        else:
            n = int(item)
            if n < 8:
                raise SystemExit(f"--sizes {item!r}: sides should be >= 8")
            cases.append(Case(f"cube_{n}", (n, n, n), "mrc"))
    return cases


def smooth_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A coarse Gaussian field (1/8 resolution) linearly upsampled, plus voxel noise (float32)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    small = tuple(max(2, s // 8) for s in shape)
    coarse = rng.standard_normal(small).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, small, strict=True)]
    vol = ndimage.zoom(coarse, zoom, order=1)[: shape[0], : shape[1], : shape[2]]
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    vol += np.float32(0.3) * rng.standard_normal(shape, dtype=np.float32)
    return vol


def write_case(case: Case, path: Path, seed: int) -> None:
    """Write the case's volume ``[x, y, z]`` as MRC or NIfTI (outside the timed part)."""
    from hypsegcli.io import VolumeGeometry, write_volume

    vol = smooth_volume(case.shape, seed)
    write_volume(path, vol, VolumeGeometry.default(case.shape, format=case.fmt))  # type: ignore[arg-type]


def hypseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "hypsegcli", "--quiet", *args]


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int, str]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of that child, return code, stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        if proc.returncode != 0:
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
    return seconds, int(usage.ru_maxrss) * 1024, proc.returncode, text


def stages_of(stdout: str) -> dict[str, float]:
    try:
        rows = json.loads(stdout)["volumes"]
        return {k: round(float(v), 1) for k, v in rows[0]["stages"].items()}
    except (ValueError, KeyError, IndexError, TypeError):
        return {}


def train_model(work: Path, env: dict[str, str]) -> Path:
    data, model = work / "train_data", work / "model.pt"
    for cmd in (
        hypseg("synth", str(data), "--n", "4", "--size", "40", "--seed", "0"),
        hypseg("train", str(data / "images"), "-o", str(model), "--steps", "20", "--seed", "0"),
    ):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
    return model


def loadavg() -> float:
    return os.getloadavg()[0]


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) against log(voxels); None with fewer than 2 sizes."""
    if len({v for v, _ in points}) < 2:
        return None
    x = np.log([v for v, _ in points])
    y = np.log([s for _, s in points])
    return float(np.polyfit(x, y, 1)[0])


def render(results: list[Result], header: dict[str, str]) -> str:
    lines = ["# hypseg at scale: wall time and peak memory", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "",
        "Each row is one child process (`hypseg embed` into an empty cache, then "
        "`hypseg cluster --k 2 --k 4 --k 8 --preview` from that cache entry). "
        "Peak = max RSS of the child (incl. touched pages of the memory-mapped cache). "
        "voxels/s counts every voxel of the volume. Load = 1-min load average before → after.",
        "",
        "| case | shape | voxels | stride | command | wall s | voxels/s | peak GiB | load | stages (s) |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        ok = r.returncode == 0
        stages = ", ".join(f"{k} {v:g}" for k, v in r.stages.items())
        lines.append(
            f"| {r.case} | {'x'.join(map(str, r.shape))} | {r.voxels:,} | {r.stride} | {r.command} | "
            f"{r.seconds:.1f}{'' if ok else ' (failed)'} | {r.voxels / r.seconds:,.0f} | "
            f"{r.peak_bytes / 2**30:.2f} | {r.load_before:.1f} → {r.load_after:.1f} | {stages} |"
        )
    fits = []
    for command in ("embed", "cluster"):
        for stride in sorted({r.stride for r in results}):
            pts = [
                (r.voxels, r.seconds)
                for r in results
                if r.command == command and r.stride == stride and r.returncode == 0
            ]
            inner = [
                (r.voxels, r.stages[command])
                for r in results
                if r.command == command
                and r.stride == stride
                and r.returncode == 0
                and r.stages.get(command, 0) > 0
            ]
            s, s_inner = slope(pts), slope(inner)
            if s is not None:
                fits.append(
                    f"| {command} | {stride} | {len(pts)} | {s:.2f} | "
                    f"{'' if s_inner is None else f'{s_inner:.2f}'} | "
                    f"{max(p[1] for p in pts) / max(p[0] for p in pts) * 1e6:.1f} |"
                )
    # wall time outside the command's own stages: process start, imports, model loading
    outside = sorted(
        r.seconds - sum(r.stages.values()) for r in results if r.returncode == 0 and r.stages
    )
    overhead = outside[len(outside) // 2] if outside else float("nan")
    if fits:
        lines += [
            "",
            "Growth: slope of log(time) against log(voxels) (1 = linear), of the wall time "
            f"(what is not the command's stages, process start and model loading, median "
            f"{overhead:.1f} s here, pulls it below 1 for small volumes) and of the command's "
            "own stage (`embed` / `cluster` in the stages column).",
            "",
            "| command | stride | sizes | slope (wall) | slope (stage) | s per Mvoxel (largest) |",
            "|---|---:|---:|---:|---:|---:|",
            *fits,
        ]
    peak = max((r.peak_bytes for r in results), default=0)
    lines += ["", f"Largest peak: {peak / 2**30:.2f} GiB.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help=f"cases (default {DEFAULT_SIZES})")
    ap.add_argument("--strides", default="1,2", help="strides, run in this order (default 1,2)")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_SIZES}")
    ap.add_argument(
        "--model", type=Path, default=None, help="model file (default: train a tiny one)"
    )
    ap.add_argument("--no-preview", action="store_true", help="cluster without --preview")
    ap.add_argument(
        "--keep", type=Path, default=None, help="work folder to keep (default: a temp one)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report (default: benchmarks/results/scale.md for the default run, else "
        "hypseg-scale.md in the temporary folder)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.out is None:  # the committed results are those of the default cases only
        partial = any(
            getattr(args, key) != ap.get_default(key)
            for key in ("quick", "sizes", "strides", "model", "no_preview")
        )
        args.out = (
            Path(tempfile.gettempdir()) / "hypseg-scale.md"
            if partial
            else ROOT / "benchmarks" / "results" / "scale.md"
        )
    # sections appended by hand to the committed results ("## Added run: ..."), which the
    # README cites, are kept below a rewritten table
    previous = args.out.read_text() if args.out.is_file() else ""
    added = previous[previous.find("\n## Added run") :] if "\n## Added run" in previous else ""
    cases = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    cases.sort(key=lambda c: c.voxels)
    strides = list(dict.fromkeys(int(s) for s in args.strides.split(",") if s.strip()))
    work = args.keep or Path(tempfile.mkdtemp(prefix="hypseg-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("HYPSEG_CACHE_DIR", None)

    import torch

    model = args.model or train_model(work, env)
    header = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}",
        "model": f"{model if args.model else 'tiny model trained here (synth 4x40^3, train --steps 20)'}"
        " (default config: m = 10, d = 2), patch size 5",
        "load average at start (1/5/15 min)": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    results: list[Result] = []
    try:
        for case in cases:
            vol = work / case.filename
            if not vol.exists():
                t0 = time.perf_counter()
                write_case(case, vol, args.seed)
                print(
                    f"[scale] wrote {vol.name} in {time.perf_counter() - t0:.1f} s (not timed)",
                    file=sys.stderr,
                )
            for stride in strides:
                cache = work / f"cache_{case.name}_s{stride}"
                seg = work / f"seg_{case.name}_s{stride}"
                for path in (cache, seg):
                    shutil.rmtree(path, ignore_errors=True)
                common = ["-m", str(model), "--stride", str(stride), "--cache-dir", str(cache)]
                cluster_args = ["-o", str(seg)] + [a for k in KS for a in ("--k", str(k))]
                if not args.no_preview:
                    cluster_args.append("--preview")
                for command, extra in (("embed", []), ("cluster", cluster_args)):
                    load0 = loadavg()
                    cmd = hypseg(command, str(vol), *common, *extra, "--json")
                    seconds, peak, rc, stdout = run_child(cmd, env)
                    results.append(
                        Result(
                            case.name,
                            case.shape,
                            stride,
                            command,
                            seconds,
                            peak,
                            rc,
                            load0,
                            loadavg(),
                            stages_of(stdout),
                        )
                    )
                    r = results[-1]
                    print(
                        f"[scale] {case.name} stride {stride} {command}: {seconds:.1f} s, "
                        f"{r.voxels / seconds:,.0f} voxels/s, peak {peak / 2**30:.2f} GiB"
                        f"{'' if rc == 0 else f', FAILED (exit {rc})'}",
                        file=sys.stderr,
                    )
                    header["load average at end (1/5/15 min)"] = " / ".join(
                        f"{v:.1f}" for v in os.getloadavg()
                    )
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(render(results, header) + added)
                    args.out.with_suffix(".json").write_text(
                        json.dumps(
                            {"header": header, "results": [vars(r) for r in results]}, indent=1
                        )
                        + "\n"
                    )
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(seg, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render(results, header))


if __name__ == "__main__":
    main()
