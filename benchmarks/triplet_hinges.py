"""Which triplets keep the triplet loss's hinge open: same-class or different-class negatives.

Usage (from the repository root, in the venv)::

    python benchmarks/triplet_hinges.py --data DATA MODEL.pt [MODEL.pt ...]

DATA is a ``hypseg synth`` folder (its ``train/images`` and ``train/labels``);
every model file is one ``hypseg train`` wrote, with or without the triplet
term. For each model the script draws ``--triplets`` triplets from the training
volumes with the model's own sampling settings and intensity scaling (the same
sampler as training, seeded), encodes anchor, positive and negative, and
reports the hinge d(a, p) - d(a, n) + margin of Eq. 8 (the model's distance and
margin): its mean after the max with 0 (the loss), the share of triplets where
it is open (> 0), and the mean distances, over all triplets and split by
whether the anchor's centre voxel and the negative's carry the same ground-truth
label at each hierarchy level (``_L1``, ``_L2``, ``_L3``).

A negative of the anchor's own class cannot be pushed away without pulling a
class apart, so the open hinges there are the part of the loss that works
against the segmentation; the rows of models trained without the triplet term
show what the loss is without being optimised.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hypsegcli.config import SamplingConfig  # noqa: E402
from hypsegcli.io import read_volume  # noqa: E402
from hypsegcli.modelfile import build_model, load_model_file  # noqa: E402
from hypsegcli.sampling import TripletSampler, normalize  # noqa: E402

LEVELS = ("L1", "L2", "L3")


def labels_at(labels: list[np.ndarray], volume: torch.Tensor, centre: torch.Tensor) -> np.ndarray:
    """The label of each centre's nearest voxel (centres in voxel coordinates)."""
    out = np.empty(len(volume), dtype=np.int64)
    for i, (v, c) in enumerate(zip(volume.tolist(), centre.tolist(), strict=True)):
        shape = labels[v].shape
        idx = tuple(min(max(round(x), 0), s - 1) for x, s in zip(c, shape, strict=True))
        out[i] = labels[v][idx]
    return out


def row(
    model: str, name: str, pick: np.ndarray, hinge: np.ndarray, d_ap: np.ndarray, d_an: np.ndarray
) -> str:
    """One table row: the triplets ``pick`` of one model."""
    h = hinge[pick]
    return (
        f"| {model} | {name}: {int(pick.sum())} | {np.maximum(h, 0).mean():.3f} "
        f"| {(h > 0).mean():.0%} | {d_ap[pick].mean():.3f} | {d_an[pick].mean():.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="hypseg model files")
    parser.add_argument("--data", type=Path, required=True, help="a hypseg synth folder")
    parser.add_argument("--volumes", type=int, default=40, help="training volumes used")
    parser.add_argument("--triplets", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    images = sorted((args.data / "train" / "images").glob("*.nii.gz"))[: args.volumes]
    if not images:
        parser.error(f"{args.data / 'train' / 'images'}: no .nii.gz volumes")
    raw = [read_volume(p).data for p in images]
    labels = {
        lvl: [
            np.asarray(
                read_volume(
                    p.parent.parent / "labels" / p.name.replace(".nii.gz", f"_{lvl}.nii.gz"),
                    native=True,
                ).data
            )
            for p in images
        ]
        for lvl in LEVELS
    }
    print(f"{len(images)} training volumes of {args.data}, {args.triplets} triplets per model")
    print(
        "| model | triplets | loss | open | d(a, p) | d(a, n) |\n| --- | --- | --- | --- | --- | --- |"
    )
    for path in args.models:
        document = load_model_file(path)
        model = build_model(document, path=path).eval()
        norm = document["normalization"]
        vols = [normalize(v, norm["method"], norm["low"], norm["high"]) for v in raw]
        sampler = TripletSampler(
            vols,
            SamplingConfig(**document["sampling_config"]),
            model.cfg.patch_size,
            generator=torch.Generator().manual_seed(args.seed),
        )
        t = sampler.sample(args.triplets)
        with torch.no_grad():
            mu = [model.encode(x)[0] for x in (t.anchor, t.positive, t.negative)]
            d_ap = model.latent_distance(mu[0], mu[1])
            d_an = model.latent_distance(mu[0], mu[2])
        hinge = (d_ap - d_an + model.cfg.margin).numpy()
        d_ap, d_an = d_ap.numpy(), d_an.numpy()

        every = np.ones(len(hinge), dtype=bool)
        print(row(path.name, "all", every, hinge, d_ap, d_an))
        for lvl in LEVELS:
            same = labels_at(labels[lvl], t.volume_index, t.anchor_center) == labels_at(
                labels[lvl], t.volume_index, t.neg_center
            )
            print(row(path.name, f"{lvl} same class", same, hinge, d_ap, d_an))
            print(row(path.name, f"{lvl} other class", ~same, hinge, d_ap, d_an))


if __name__ == "__main__":
    main()
