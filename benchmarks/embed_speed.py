"""Speed of dense embedding: the per-patch reference against the fast path.

Usage (from the repository root, in the venv)::

    python benchmarks/embed_speed.py                 # 50^3, reference vs fast path
    python benchmarks/embed_speed.py --brain         # + a 197x233x189 volume, fast path
    python benchmarks/embed_speed.py --shape 64,64,64 --tile 24 --rounds 5

Default model (``ModelConfig()``, random weights), patch size p = 5 (q = m/p = 2),
a random volume in [0, 1]. Prints voxels/s of both paths, their ratio, the fast
path's FLOPs per voxel (:func:`hypsegcli.embedding.flops_per_voxel`), its achieved
FLOP rate and the fraction of this machine's float32 matrix-product rate
(a 2048x2048 ``torch.matmul``, best of several, measured in the same run).

``--brain`` / ``--big-shape`` time one large volume at stride 1 in a child
process and report its wall time and peak resident memory (``ru_maxrss`` of the
child: torch allocations are invisible to tracemalloc). Timings on a shared
machine are noisy: the matmul rate is measured before and after to show it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import matmul_rate  # noqa: E402

from hypsegcli.config import ModelConfig  # noqa: E402
from hypsegcli.embedding import (  # noqa: E402
    DEFAULT_TILE,
    embed_reference,
    embed_volume,
    flops_per_voxel,
)
from hypsegcli.model import HypVAE  # noqa: E402

BRAIN_SHAPE = (197, 233, 189)


def make_model(seed: int) -> HypVAE:
    torch.manual_seed(seed)
    return HypVAE(ModelConfig()).eval()


def make_volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} should be three positive integers X,Y,Z")
    return parts  # type: ignore[return-value]


def child(args: argparse.Namespace) -> None:
    """Time one big volume (run as a subprocess so ru_maxrss is its own)."""
    torch.set_num_threads(args.threads)
    model = make_model(args.seed)
    vol = make_volume(args.big_shape, args.seed)
    n_tiles = [0, 0]

    def progress(stage: str, done: int, total: int) -> None:
        n_tiles[:] = [done, total]

    t0 = time.perf_counter()
    mu = embed_volume(model, vol, patch_size=args.patch_size, tile=args.tile, progress=progress)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(
        json.dumps(
            {
                "shape": list(vol.shape),
                "wall_s": wall,
                "voxels_per_s": vol.size / wall,
                "peak_rss_bytes": rss,
                "tiles": n_tiles[1],
                "finite": bool(np.isfinite(mu).all()),
                "max_norm": float(np.linalg.norm(mu, axis=-1).max()),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shape", type=parse_shape, default=(50, 50, 50), help="volume for the comparison"
    )
    ap.add_argument("--patch-size", type=float, default=5.0)
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternating timing rounds (best is reported)"
    )
    ap.add_argument(
        "--ref-slices",
        type=int,
        default=10,
        help="time the reference on the first N x-slices of the volume (default 10)",
    )
    ap.add_argument(
        "--ref-batch",
        type=int,
        default=8192,
        help="patches per encoder call (8192 measured fastest)",
    )
    ap.add_argument(
        "--brain", action="store_true", help=f"also time a {BRAIN_SHAPE} volume at stride 1"
    )
    ap.add_argument(
        "--big-shape", type=parse_shape, default=None, help="like --brain, with this shape"
    )
    ap.add_argument("--skip-compare", action="store_true", help="only the big volume")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.brain and args.big_shape is None:
        args.big_shape = BRAIN_SHAPE
    if args.skip_compare and args.big_shape is None:
        ap.error("--skip-compare leaves nothing to measure without --brain or --big-shape")
    if args.child:
        child(args)
        return

    torch.set_num_threads(args.threads)
    p = args.patch_size
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, mkldnn {torch.backends.mkldnn.is_available()}, "
        f"os.cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}"
    )
    rate0 = matmul_rate()
    print(f"float32 matmul 2048^2: {rate0 / 1e9:.1f} GFLOP/s (best of 5)")
    model = make_model(args.seed)
    fpv = flops_per_voxel(model, p)
    print(
        f"model: ModelConfig() (m={model.cfg.patch_size}, {model.num_parameters()} parameters), p={p:g}, "
        f"tile={args.tile}"
    )
    print(f"fast path FLOPs per voxel: {fpv / 1e6:.2f} MFLOP")

    if not args.skip_compare:
        vol = make_volume(args.shape, args.seed)
        slab = vol[: args.ref_slices]
        embed_volume(model, vol[: min(12, vol.shape[0])], patch_size=p, tile=args.tile)  # warm-up
        embed_reference(model, slab[:1], patch_size=p, batch=args.ref_batch)
        # Rounds alternate the two paths so that both see the same (shared) machine;
        # the reference runs on a slab of the volume (same voxels/s, less waiting).
        fast_rates, ref_rates = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            embed_volume(model, vol, patch_size=p, tile=args.tile)
            fast_rates.append(vol.size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            ref = embed_reference(model, slab, patch_size=p, batch=args.ref_batch)
            ref_rates.append(slab.size / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        embed_volume(model, vol, patch_size=p, tile=args.tile, stride=2)
        stride2_rate = vol.size / (time.perf_counter() - t0)
        fast_slab = embed_volume(model, slab, patch_size=p, tile=args.tile)
        err = np.abs(fast_slab - ref).max() / np.abs(ref).max()
        rate1 = matmul_rate()
        fast_rate, ref_rate = max(fast_rates), max(ref_rates)
        ratios = sorted(f / r for f, r in zip(fast_rates, ref_rates, strict=True))
        achieved = fpv * fast_rate
        print(
            f"reference: {ref_rate:,.0f} voxels/s (best of {args.rounds} rounds on {slab.shape}, "
            f"batch {args.ref_batch}; rounds: {', '.join(f'{r:,.0f}' for r in ref_rates)})"
        )
        print(
            f"fast path: {fast_rate:,.0f} voxels/s (best of {args.rounds} rounds on {vol.shape}; "
            f"rounds: {', '.join(f'{r:,.0f}' for r in fast_rates)})"
        )
        print(
            f"fast path stride 2: {stride2_rate:,.0f} voxels/s "
            f"({flops_per_voxel(model, p, stride=2) / 1e6:.2f} MFLOP per voxel, interpolation included)"
        )
        print(
            f"speed-up fast/reference: {fast_rate / ref_rate:.1f}x (best vs best); per round "
            f"{', '.join(f'{r:.1f}x' for r in ratios)}; max |fast - ref| / max |ref| = {err:.1e}"
        )
        print(
            f"fast path: {achieved / 1e9:.1f} GFLOP/s = {achieved / max(rate0, rate1):.0%} of the matmul rate "
            f"(matmul {rate0 / 1e9:.1f} before, {rate1 / 1e9:.1f} GFLOP/s after)"
        )

    if args.big_shape is not None:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--big-shape",
            ",".join(map(str, args.big_shape)),
            "--patch-size",
            str(p),
            "--tile",
            str(args.tile),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rate2 = matmul_rate()
        print(
            f"volume {tuple(res['shape'])} stride 1: {res['wall_s']:.1f} s wall "
            f"({res['wall_s'] / 60:.2f} min, {res['voxels_per_s']:,.0f} voxels/s, {res['tiles']} tiles), "
            f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB; finite {res['finite']}, "
            f"max |mu| {res['max_norm']:.3f}; matmul after: {rate2 / 1e9:.1f} GFLOP/s, "
            f"load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
