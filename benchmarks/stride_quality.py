"""What ``--stride`` costs in segmentation quality, and what it saves in time.

Usage (from the repository root, in the venv)::

    python benchmarks/stride_quality.py                        # train 2 min, strides 1 2 3 4
    python benchmarks/stride_quality.py --model model.pt --strides 1,2,4
    python benchmarks/stride_quality.py --size 96 --n-test 2   # larger test volumes

Synthesises training and test volumes (``hypseg synth``, different seeds),
trains a model with the library's configuration defaults (``ModelConfig``,
``SamplingConfig``: the paper's loss, ``--beta 8 --texture-weight 0 --r-max
34``, not the CLI's defaults) for ``--train-minutes`` unless ``--model`` is
given, then for every stride embeds the test volumes into a fresh cache
(timed), clusters them at k = 2, 4, 8 without spatial steps (the k-means labels
as they are: ``pipeline.cluster``'s defaults, ``--smooth 0 --snap 0 --mrf 0
--nest 0`` on the command line) and scores them against the ground truth (mean
Hungarian-matched Dice per level). Stride 1 is the
reference measured in the same run; the intensity k-means baseline is printed
for scale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypsegcli import pipeline  # noqa: E402
from hypsegcli.config import ModelConfig, SamplingConfig, TrainConfig  # noqa: E402
from hypsegcli.errors import BadInputError  # noqa: E402

KS = [2, 4, 8]


def dice_by_level(seg: Path, truth: Path) -> dict[int, float]:
    report = pipeline.evaluate(seg, truth, hausdorff=False)
    return {int(s["level"]): float(s["mean_dice"]) for s in report["summary"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a trained model (default: train one)")
    parser.add_argument("--train-minutes", type=float, default=2.0)
    parser.add_argument("--n-train", type=int, default=12)
    parser.add_argument("--n-test", type=int, default=3)
    parser.add_argument("--size", type=int, default=50, help="side of the test volumes")
    parser.add_argument("--strides", default="1,2,3,4")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--workdir", type=Path, help="keep the data here (default: a temporary folder)"
    )
    args = parser.parse_args()
    strides = [int(s) for s in args.strides.split(",")]
    # stride 1, the reference, first (whatever the order given), each stride once
    strides = [1, *dict.fromkeys(s for s in strides if s != 1)]

    try:
        rows, base, model = measure(args, strides)
    except BadInputError as exc:  # e.g. a reused --workdir synthesised with another --size
        parser.error(str(exc))
    report(args, rows, base, model)


def measure(args: argparse.Namespace, strides: list[int]) -> tuple[list, dict, Path]:
    """Train (or take --model), embed at every stride into a fresh cache, cluster, score."""
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        test = work / "test"
        pipeline.synth(test, n=args.n_test, size=args.size, seed=1)
        model = args.model
        if model is None:
            pipeline.synth(work / "train", n=args.n_train, seed=0)
            model = work / "model.pt"
            summary = pipeline.train(
                [work / "train" / "images"],
                model,
                model_config=ModelConfig(),
                sampling_config=SamplingConfig(),
                train_config=TrainConfig(steps=None, max_minutes=args.train_minutes),
                device="cpu",
                threads=args.threads,
                overwrite=True,  # (a reused --workdir: trained again, as the run asks)
            )
            print(f"trained {summary['step']} steps in {summary['elapsed_seconds']:.0f} s")

        pipeline.cluster(
            [test / "images"], work / "seg_intensity", ks=KS, features="intensity", seed=0
        )
        base = dice_by_level(work / "seg_intensity", test / "labels")

        rows = []
        for s in strides:
            cache = work / f"cache_s{s}"
            shutil.rmtree(cache, ignore_errors=True)  # a fresh cache: every voxel embedded
            seg = work / f"seg_s{s}"
            shutil.rmtree(seg, ignore_errors=True)
            report = pipeline.embed(
                [test / "images"],
                model,
                stride=s,
                cache_dir=cache,
                threads=args.threads,
                device="cpu",
            )
            seconds = sum(v["seconds"] for v in report["volumes"])
            pipeline.cluster(
                [test / "images"],
                seg,
                ks=KS,
                model_path=model,
                stride=s,
                cache_dir=cache,
                seed=0,
                device="cpu",
            )
            rows.append((s, seconds, dice_by_level(seg, test / "labels")))
    return rows, base, model


def report(args: argparse.Namespace, rows: list, base: dict, model: Path) -> None:
    voxels = args.n_test * args.size**3
    ref_seconds, ref_dice = rows[0][1], rows[0][2]  # stride 1
    trained = f"trained here for {args.train_minutes:g} min" if args.model is None else model
    print(f"{args.n_test} test volumes of {args.size}^3, model {trained}")
    print(
        f"{'stride':>6} {'embed s':>8} {'voxels/s':>10} {'speedup':>8}   "
        + "   ".join(f"Dice L{lvl} (vs s=1)" for lvl in sorted(ref_dice))
    )
    for s, seconds, dice in rows:
        cells = "   ".join(
            f"{dice[lvl]:.3f} ({dice[lvl] - ref_dice[lvl]:+.3f})" for lvl in sorted(ref_dice)
        )
        print(
            f"{s:>6} {seconds:>8.2f} {voxels / seconds:>10,.0f} {ref_seconds / seconds:>7.2f}x   {cells}"
        )
    print(
        "intensity k-means baseline:   "
        + "   ".join(f"L{lvl} {base[lvl]:.3f}" for lvl in sorted(base))
    )


if __name__ == "__main__":
    main()
