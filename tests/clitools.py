"""Shared by the command-line tests: run ``hypseg`` in-process and build a tiny trained pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hypsegcli.cli import main

#: `hypseg train` options for a small model of the default layout and tiny batches
TINY_MODEL = ["--patch-size", "9", "--r-min", "6", "--r-max", "10", "--batch-size", "4"]
#: the same on 2 threads: a model that trains in a second
TINY_TRAIN = [*TINY_MODEL, "--threads", "2"]


def blob_and_two_specks() -> np.ndarray:
    """(3 120, 2) points of the unit ball: a broad blob of 3 000 at the origin and two tight
    clusters of 60 beside it. The k = 3 restarts that split the blob have the least
    inertia; one that leaves it whole has the larger silhouette (``cluster --select``)."""
    rng = np.random.default_rng(0)
    return np.vstack(
        [
            rng.normal([0.0, 0.0], 0.15, size=(3000, 2)),
            rng.normal([0.6, 0.0], 0.01, size=(60, 2)),
            rng.normal([0.6, 0.1], 0.01, size=(60, 2)),
        ]
    )


def run(argv, capsys):
    """Run ``hypseg argv`` through the console entry point; return (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def tiny_pipeline(root: Path, *, steps: int, mrc: bool = False) -> Path:
    """``root/data``: 3 synthetic 20^3 volumes (seed 2), ``root/model.pt`` trained on them for
    ``steps`` steps, and with ``mrc`` one MRC volume in ``root/mrc``. Returns ``root``."""
    with pytest.raises(SystemExit) as info:
        main(["--quiet", "synth", str(root / "data"), "--n", "3", "--size", "20", "--seed", "2"])
    assert info.value.code == 0
    if mrc:
        with pytest.raises(SystemExit) as info:
            main(
                [
                    "--quiet",
                    "synth",
                    str(root / "mrc"),
                    "--n",
                    "1",
                    "--size",
                    "20",
                    "--format",
                    "mrc",
                ]
            )
        assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--quiet",
                "train",
                str(root / "data" / "images"),
                "-o",
                str(root / "model.pt"),
                "--steps",
                str(steps),
                *TINY_TRAIN,
            ]
        )
    assert info.value.code == 0
    return root
