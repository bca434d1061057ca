"""Training steps of the full model with the triplet term's open hinges only re-encoded,
against encoding every positive and negative with gradients, in the same run.

Usage (from the repository root, in the venv)::

    python benchmarks/triplet_speed.py                       # trains a start point first
    python benchmarks/triplet_speed.py --model model.pt      # start from a trained model file

``HypVAE.loss`` encodes positives and negatives without gradients, then encodes
again, with gradients, only those of the triplets whose hinge max(0, d(a, p) -
d(a, n) + margin) is open: a closed hinge contributes no gradient, so the loss
and the gradients are those of encoding all of them with gradients (the
reference; ``tests/test_model.py`` checks they agree to 1e-9 in float64). What
it saves depends on the share of open hinges, which is 100% for an untrained
model (all means sit at one point, so every hinge equals the margin) and falls
as training separates them. So both paths are timed from the same trained
weights: by default those of the full model (the CLI's defaults: ``--beta 2``,
texture head, anchors of side 5-16) after ``--warm-steps`` steps on synthetic
50^3 volumes, or those of ``--model``. Each path gets its own copy of the model
and optimiser and the same triplets; rounds of ``--round`` steps alternate
between them (``--rounds`` each), so that other load on the machine falls on
both alike. Prints triplets/s of each path, their ratio and the share of open
hinges.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hypsegcli import synth  # noqa: E402
from hypsegcli.config import ModelConfig, SamplingConfig  # noqa: E402
from hypsegcli.geometry import geoopt  # noqa: E402
from hypsegcli.model import HINGE_SLACK, HypVAE  # noqa: E402
from hypsegcli.modelfile import build_model, load_model_file  # noqa: E402
from hypsegcli.sampling import TripletSampler, normalize_volume  # noqa: E402


def encode_all_with_gradients(self, mu_a, means, others, h_pn):
    """The reference for ``HypVAE._triplet_means``: every positive and negative
    encoded with gradients."""
    return self.encode(others)[0].split(mu_a.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a hypseg model file to start from")
    parser.add_argument("--warm-steps", type=int, default=300, help="training before timing")
    parser.add_argument("--volumes", type=int, default=20, help="synthetic training volumes")
    parser.add_argument("--size", type=int, default=50, help="side of each volume")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--round", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per path")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    vols = [
        torch.from_numpy(normalize_volume(synth.generate_case(rng, args.size).image, 1.0, 99.0))
        for _ in range(args.volumes)
    ]
    if args.model:
        document = load_model_file(args.model)
        model = build_model(document, path=args.model)
        sampling = SamplingConfig(**document["sampling_config"])
        start = f"{args.model}"
    else:
        # the CLI's defaults for the full model
        cfg = ModelConfig(gyroconv=True, triplet=True, beta=2.0, texture_weight=700.0)
        sampling = SamplingConfig(r_max=16, scale_sampling="log")
        torch.manual_seed(0)
        model = HypVAE(cfg)
        start = f"the full model after {args.warm_steps} steps"
    if not model.cfg.triplet:
        parser.error("the model has no triplet term (trained with --no-triplet)")
    m, n = model.cfg.patch_size, args.batch_size
    sampler = TripletSampler(vols, sampling, m, generator=torch.Generator().manual_seed(1))
    noise = torch.Generator().manual_seed(2)

    def train(net: HypVAE, opt, batches: list) -> float:
        t0 = time.perf_counter()
        for tr in batches:
            opt.zero_grad(set_to_none=True)
            net.loss(tr.anchor, tr.positive, tr.negative, generator=noise)["total"].backward()
            opt.step()
        return time.perf_counter() - t0

    if not args.model:
        opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-3, amsgrad=True)
        train(model, opt, [sampler.sample(n) for _ in range(args.warm_steps)])

    fast = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    ref._triplet_means = types.MethodType(encode_all_with_gradients, ref)
    opts = {
        name: geoopt.optim.RiemannianAdam(net.parameters(), lr=1e-3, amsgrad=True)
        for name, net in (("fast", fast), ("ref", ref))
    }
    elapsed = {"fast": 0.0, "ref": 0.0}
    open_share = []
    for r in range(args.rounds + 1):  # round 0 warms both paths up, untimed
        batches = [sampler.sample(n) for _ in range(args.round)]
        with torch.no_grad():
            for tr in batches:
                mu = fast.encode(torch.cat([tr.anchor, tr.positive, tr.negative]))[0]
                hinge = fast._triplet_hinge(*mu.split(n))
                open_share.append(float((hinge > -HINGE_SLACK).float().mean()))
        for name, net in (
            (("fast", fast), ("ref", ref)) if r % 2 else (("ref", ref), ("fast", fast))
        ):
            dt = train(net, opts[name], batches)
            if r:
                elapsed[name] += dt
    steps = args.rounds * args.round
    tps = {k: steps * n / v for k, v in elapsed.items()}
    print(f"threads {torch.get_num_threads()}, batch {n}, start: {start}")
    print(
        f"open hinges: {np.mean(open_share):.0%} of the triplets "
        f"(min {min(open_share):.0%}, max {max(open_share):.0%} per batch)"
    )
    print(f"open hinges re-encoded: {tps['fast']:.1f} triplets/s ({steps} steps)")
    print(f"reference, all encoded with gradients: {tps['ref']:.1f} triplets/s")
    print(f"ratio {tps['fast'] / tps['ref']:.2f}x")


if __name__ == "__main__":
    main()
