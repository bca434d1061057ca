"""A spatial latent, measured: several ball points per patch, convolved by the gyroplane layer.

Usage (from the repository root, in the venv)::

    python benchmarks/spatial_latent.py --data ./data       # a synth folder with a val split
    python benchmarks/spatial_latent.py --quick              # tiny data, a few minutes

The tool's model (:class:`hypsegcli.model.HypVAE`) encodes a patch to ONE ball
point, so its gyroplane layer (Eq. 7) sees a 1x1x1 grid: every output
position sees the point through another kernel offset, and near the origin,
where the points lie, that is close to a linear layer on log_0(z), the
hyperbolic base's first decoder layer (``benchmarks/gyroplane_linearity.py``:
median R^2 0.994). METHOD.md points at the other reading: a latent that is a
grid of ball points, which the gyroplane layer convolves spatially. This script
measures that reading as a prototype, outside the tool: it is not a
``hypseg train`` option.

Prototype (:class:`SpatialVAE`): the encoder head keeps a G^3 grid of latents
per m^3 patch (G = 2 for the default trunk, whose output side is 2: the head's
kernel is S - G + 1 = 1, so each grid point sees a 9^3 sub-window); the
posterior, KL and prior are per grid point (KL summed over the grid, or
averaged with ``--kl mean``, so that a patch pays what one point pays); the
decoder's first layer maps the grid to the trunk side S with a 3x3x3 kernel,
padding 1: :class:`~hypsegcli.layers.GyroplaneConv3d` (``--gyroconv``) or a
``Conv3d`` on log_0(z) (hyperbolic base) or on z (Euclidean). A patch's
embedding, used by the triplet loss, the texture head (``train``'s default
``--texture-weight``) and ``hypseg embed`` / ``cluster``, is the mean of its
G^3 points in the tangent space at the origin (their plain mean for
Euclidean; the texture head gets the tangent mean of the sampled grid). The
prototype runs the unchanged CLI with the model class swapped (``--cli``);
the embedding falls back to one patch per voxel, so every row here, the
tool's own models included, is clustered with ``--stride 2`` for the same
protocol.

Rows: Table 2's rows with the spatial latent, and the tool's hyperbolic base
and full model as references, each trained for ``--minutes`` per seed,
clustered at k = 2, 4, 8 on the validation split with all spatial steps and
without them (``--smooth 0 --snap 0 --mrf 0 --nest 0``), scored with
``hypseg evaluate`` (mean Hungarian-matched Dice). Nothing is written into
the repository; results go to ``--workdir``, where a rerun reuses the rows
finished with the same commands (row, seed, ``--kl``, ``--minutes``, ``--split``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ablation  # noqa: E402  (benchmarks/ablation.py: training, clustering and scoring rows)
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from hypsegcli import geometry  # noqa: E402
from hypsegcli import model as model_module  # noqa: E402
from hypsegcli.layers import GyroplaneConv3d  # noqa: E402

#: Grid side of the latent per patch, and the decoder's first kernel.
GRID = 2
KERNEL = 3

#: (name, spatial latent?, ``hypseg train`` switches)
ROWS = {
    "spatial euclidean base": (True, ("--geometry", "euclidean", "--no-triplet")),
    "spatial hyperbolic base": (True, ("--no-gyroconv", "--no-triplet")),
    "spatial + gyroconv": (True, ("--gyroconv", "--no-triplet")),
    "spatial + triplet": (True, ("--no-gyroconv", "--triplet")),
    "spatial + gyroconv & triplet": (True, ("--gyroconv", "--triplet")),
    "tool: hyperbolic base": (False, ("--no-gyroconv", "--no-triplet")),
    "tool: full model": (False, ("--gyroconv", "--triplet")),
}

_Base = model_module.HypVAE
#: How the grid's KL terms combine: "sum" or "mean" (``--kl``; ``--cli`` subprocesses
#: take it from their command line).
KL_MODE = "sum"


class SpatialVAE(_Base):
    """:class:`~hypsegcli.model.HypVAE` with a GRID^3 grid of latents per patch (see above)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        S = self.trunk_size
        if S < GRID or (S - GRID + KERNEL - 1) % 2:
            raise ValueError(f"trunk side {S} does not fit a {GRID}^3 latent grid")
        c_last, d = cfg.channels[-1], cfg.latent_dim
        self.enc_fc = nn.Conv3d(c_last, cfg.hidden, S - GRID + 1)
        self.enc_mu = nn.Conv3d(cfg.hidden, d, 1)
        self.enc_scale = nn.Conv3d(cfg.hidden, d, 1)
        pad = (S - GRID + KERNEL - 1) // 2
        if cfg.uses_gyroconv:
            self.dec_first = GyroplaneConv3d(
                1,
                c_last,
                kernel_size=KERNEL,
                dim=d,
                padding=pad,
                c=cfg.curvature,
                p_init_std=cfg.gyroplane_init,
            )
        else:
            self.dec_first = nn.Conv3d(d, c_last, KERNEL, padding=pad)

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Latent means and scales of every grid point, maps of side X - m + GRID."""
        return _Base.encode_dense(self, x)

    def _pool(self, mu_g: Tensor, scale_g: Tensor) -> tuple[Tensor, Tensor]:
        """Per m^3 window: the tangent mean at the origin of its GRID^3 points."""
        if self.cfg.hyperbolic:
            c = self.cfg.curvature
            v = geometry.logmap0(mu_g.movedim(1, -1), c=c).movedim(-1, 1)
            v = F.avg_pool3d(v, GRID, stride=1).movedim(1, -1)
            mu = geometry.project(geometry.expmap0(v, c=c), c=c).movedim(-1, 1)
        else:
            mu = F.avg_pool3d(mu_g, GRID, stride=1)
        return mu, F.avg_pool3d(scale_g, GRID, stride=1)

    def encode_dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._pool(*self._grid(x))

    def _decode_grid(self, z: Tensor) -> Tensor:
        """Voxel means of latent grids z (B, G, G, G, d): (B, 1, m, m, m)."""
        cfg = self.cfg
        if cfg.uses_gyroconv:
            h = self.dec_first(z.unsqueeze(1))
        else:
            if cfg.hyperbolic:
                z = geometry.logmap0(z, c=cfg.curvature)
            h = self.dec_first(z.movedim(-1, 1))
        return self.decoder(h)

    def loss(self, anchor, positive, negative, *, generator=None) -> dict[str, Tensor]:
        cfg = self.cfg
        if cfg.likelihood != "unit":
            raise ValueError("the prototype has the unit likelihood only")
        n, d, k = anchor.shape[0], cfg.latent_dim, cfg.mc_samples
        if cfg.triplet:
            mu_g, scale_g = self._grid(torch.cat([anchor, positive, negative]))
            mu_a, mu_p, mu_n = self._pool(mu_g, scale_g)[0].flatten(1).split(n)
            mu_ga, scale_ga = mu_g[:n], scale_g[:n]
        else:
            mu_ga, scale_ga = self._grid(anchor)
            mu_a = self._pool(mu_ga, scale_ga)[0].flatten(1)
            with torch.no_grad():
                mu_p, mu_n = (
                    self.encode_dense(torch.cat([positive, negative]))[0].flatten(1).split(n)
                )
        mu_flat = mu_ga.movedim(1, -1).reshape(-1, d)
        scale_flat = scale_ga.movedim(1, -1).reshape(-1, d)
        z, log_q, log_p = self._sample_posterior(mu_flat, scale_flat, k, generator)
        kl = (log_q - log_p).reshape(k, n, -1)
        kl = kl.mean(-1) if KL_MODE == "mean" else kl.sum(-1)
        kl = kl.mean().to(anchor.dtype)
        z = z.to(anchor.dtype).reshape(k * n, GRID, GRID, GRID, d)
        x_hat = self._decode_grid(z).reshape(k, n, *anchor.shape[1:])
        pred = None
        if cfg.texture_weight > 0:  # the head sees the grid's tangent mean, as embeddings do
            zg = z.reshape(k, n, GRID**3, d)
            v = geometry.logmap0(zg, c=cfg.curvature) if cfg.hyperbolic else zg
            pred = self.dec_texture(v.mean(-2)).squeeze(-1)
        return self._objective(anchor, x_hat, None, kl, (mu_a, mu_p, mu_n), pred)


def run_cli(argv: list[str]) -> None:
    """``--cli --kl sum|mean ARGS``: the unchanged ``hypseg`` command line ``ARGS`` with
    :class:`SpatialVAE` as the model class."""
    global KL_MODE
    from hypsegcli.cli import main as cli_main

    KL_MODE = argv[1]
    model_module.HypVAE = SpatialVAE
    sys.argv = ["hypseg", *argv[2:]]
    cli_main()


def main() -> None:
    if sys.argv[1:2] == ["--cli"]:
        run_cli(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a hypseg synth folder with train/ and val/")
    parser.add_argument("--split", default="val", help="the split clustered and scored")
    parser.add_argument("--minutes", type=float, default=5.0, help="training per model")
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}"
    )
    parser.add_argument(
        "--kl", choices=("sum", "mean"), default="sum", help="the grid's KL terms: sum or mean"
    )
    parser.add_argument("--workdir", type=Path, help="results and models (default: temporary)")
    parser.add_argument(
        "--quick", action="store_true", help="synthesise 12 volumes of 24^3, 0.2 min training"
    )
    args = parser.parse_args()
    seeds, names = ablation.seeds_and_rows(parser, args, ROWS)
    if args.quick:
        args.minutes = min(args.minutes, 0.2)
    prototype = (sys.executable, str(Path(__file__).resolve()), "--cli", "--kl", args.kl)
    plan = {
        name: (prototype if ROWS[name][0] else ablation.HYPSEG, ROWS[name][1]) for name in names
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = ablation.data_folder(parser, args, work)
        # the prototype embeds one patch per voxel (no fast path): every row every 2nd voxel
        results = ablation.measure(
            plan,
            seeds,
            data=data,
            work=work,
            split=args.split,
            budget=("--max-minutes", str(args.minutes)),
            cluster_args=("--stride", "2"),
            parts=1,
        )
    print(
        f"Spatial latent ({GRID}^3 points per patch, KL {args.kl} over the grid, decoder "
        f"kernel {KERNEL}) against the tool's one-point latent: {args.split} split, "
        f"{args.minutes:g} min of training per model, seeds "
        f"{', '.join(map(str, seeds))}, --stride 2 for every row. "
        "Mean Dice L1 / L2 / L3 (mean over seeds; ± std over seeds where there are several)."
    )
    print()
    print("\n".join(ablation.table(names, seeds, results)))


if __name__ == "__main__":
    main()
