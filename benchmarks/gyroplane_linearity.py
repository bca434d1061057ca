"""How far is a trained gyroplane layer from a linear layer on log_0(z)? (issue 5's ablation)

The Table 2 row "+ gyroconv" differs from the hyperbolic base only in the
decoder's first layer: a gyroplane convolution on the ball point z instead of
a linear layer on log_0(z). With every offset p at the origin a gyroplane is
a diameter, and along its normal a the layer gives 2‖a‖ asinh(2‖z‖ / (1 -
‖z‖²)) = 4‖a‖ artanh(‖z‖), a multiple of ‖log_0(z)‖, so the two layers can
only differ off the normals' directions and where p has moved away from the
origin.

For every model file given this draws points uniformly in the ball of radius
``--radius`` (in units of 1/√c; the embeddings of the validation data lie
within about 0.7), evaluates the decoder's first layer on them, fits every
output feature by least squares on (log_0(z), 1) in float64, and prints the
R² of the fits (median, 5th percentile, minimum over the features) and the
median ‖p‖√c of the gyroplanes. Models without a gyroplane layer are skipped
with a line saying so.

Run: python benchmarks/gyroplane_linearity.py MODEL.pt [MODEL.pt ...]
        [--radius 0.7] [--points 4000] [--seed 0]

Measured on the validation study's 1 044-step "+ gyroconv" models (seeds 0,
1, 2): R² median 0.994 for each (5th percentile 0.988-0.989), median ‖p‖√c
0.061-0.063 (0.059 at initialisation); the `--beta 2` full models (2 250
steps, seeds 0-2): 0.994 each, ‖p‖ 0.061-0.065; with
``train --gyroplane-init 0.5`` (1 044 steps, seeds 0-2): R² median 0.946 /
0.937 / 0.942, ‖p‖ 0.51-0.53.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from hypsegcli import geometry
from hypsegcli.errors import BadInputError
from hypsegcli.modelfile import build_model, load_model_file


def ball_points(n: int, dim: int, radius: float, c: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` points uniform (by volume) in the Euclidean ball of radius ``radius / √c``."""
    direction = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    r = radius * torch.rand(n, 1, generator=gen, dtype=torch.float64).pow(1.0 / dim)
    return direction * r / math.sqrt(c)


def linear_fit_r2(features: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
    """R² of the least-squares fit of every column of ``features`` on ``design``."""
    coef = torch.linalg.lstsq(design, features).solution
    residual = features - design @ coef
    return 1 - residual.var(0) / features.var(0).clamp_min(1e-300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--radius", type=float, default=0.7)
    parser.add_argument("--points", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.radius < 1:
        parser.error(f"--radius {args.radius} should be in (0, 1)")
    torch.set_num_threads(1)
    for path in args.models:
        try:
            model = build_model(load_model_file(path), path=path)
        except BadInputError as exc:  # a missing or malformed model file: one line, exit 2
            parser.error(str(exc))
        cfg = model.cfg
        if not cfg.uses_gyroconv:
            print(f"{path}: no gyroplane layer (geometry {cfg.geometry}, gyroconv {cfg.gyroconv})")
            continue
        c, d = cfg.curvature, cfg.latent_dim
        gen = torch.Generator().manual_seed(args.seed)
        z = ball_points(args.points, d, args.radius, c, gen)
        layer = model.dec_first.double()
        with torch.no_grad():
            out = layer(z.reshape(args.points, 1, 1, 1, 1, d)).reshape(args.points, -1)
        design = torch.cat([geometry.logmap0(z, c=c), torch.ones(args.points, 1).double()], 1)
        r2 = linear_fit_r2(out, design)
        p_norm = layer.p.detach().norm(dim=-1).flatten() * math.sqrt(c)
        print(
            f"{path}: R2 of a linear fit on log0(z), {out.shape[1]} features, "
            f"|z| <= {args.radius}/sqrt(c): median {float(r2.median()):.4f}, "
            f"5% {float(torch.quantile(r2, 0.05)):.4f}, min {float(r2.min()):.4f}; "
            f"median |p| sqrt(c) {float(p_norm.median()):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
