"""Training throughput of the paper's full model, and where the time goes.

Usage (from the repository root, in the venv)::

    python benchmarks/train_speed.py                    # full model, 20 synthetic 50^3 volumes
    python benchmarks/train_speed.py --arch paper       # the authors' padded k5 encoder
    python benchmarks/train_speed.py --profile          # + the top operators by self time

One training step is what ``hypseg train`` does for the paper's full model with
the paper's loss (the library's ``ModelConfig`` defaults: ``--beta 8
--texture-weight 0 --r-max 34``; the CLI's defaults add a texture head of d ->
32 -> 1, a small fraction of the encoder's cost, and draw smaller anchors,
resampled to the same m^3): draw a batch of triplets
(anchor, positive, negative patches resampled to m^3), encode all three,
decode K posterior samples of the anchor, backward, Riemannian Adam step.
(``hypseg train --no-triplet`` encodes positive and negative without
gradients, so its steps are cheaper than the count below; this script times
the full model only.)
The script times whole steps (triplets/s) and, in separate steps, each phase
(sampling, forward, backward, optimizer).

FLOPs per triplet are counted analytically (``HypVAE.flops_per_patch``): the
forward pass encodes 3 patches and decodes K; the backward pass costs about
twice the forward pass of the layers that need gradients (here all of them),
so a step costs about 3 x (3 encoder + K decoder) FLOPs per triplet. The
achieved rate is compared with this machine's float32 matrix-product rate (a
2048 x 2048 ``torch.matmul``, best of several), measured in the same run
before and after the timing, since shared machines are noisy. The other
``--arch`` layout is timed in the same run as the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import matmul_rate  # noqa: E402

from hypsegcli import synth  # noqa: E402
from hypsegcli.config import ModelConfig, SamplingConfig  # noqa: E402
from hypsegcli.geometry import geoopt  # noqa: E402
from hypsegcli.model import HypVAE  # noqa: E402
from hypsegcli.sampling import TripletSampler, normalize_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=20, help="synthetic training volumes")
    parser.add_argument("--size", type=int, default=50, help="side of each volume")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed whole steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--arch", choices=("valid", "paper"), default="valid")
    parser.add_argument("--mc-samples", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--reference-steps", type=int, default=10, help="steps of the other --arch (0: skip)"
    )
    parser.add_argument("--profile", action="store_true", help="print the top operators")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rng = np.random.default_rng(0)
    vols = [
        normalize_volume(synth.generate_case(rng, args.size).image, 1.0, 99.0)
        for _ in range(args.volumes)
    ]
    tensors = [torch.from_numpy(v).to(dev) for v in vols]
    n = args.batch_size

    def make_step(arch: str):
        """A training step of `hypseg train --arch ARCH` (full model, explicitly) and its model."""
        layout = {"kernels": (5, 5, 5, 5), "paddings": (2, 1, 1, 0)} if arch == "paper" else {}
        cfg = ModelConfig(mc_samples=args.mc_samples, gyroconv=True, triplet=True, **layout)
        torch.manual_seed(0)
        model = HypVAE(cfg).to(dev)
        sampler = TripletSampler(
            tensors, SamplingConfig(), cfg.patch_size, generator=torch.Generator(dev).manual_seed(1)
        )
        noise = torch.Generator(dev).manual_seed(2)
        opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-3, amsgrad=True)

        def step(phases: dict[str, float] | None = None) -> None:
            t0 = time.perf_counter()
            tr = sampler.sample(n)
            sync()
            t1 = time.perf_counter()
            losses = model.loss(tr.anchor, tr.positive, tr.negative, generator=noise)
            sync()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            sync()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sync()
            t4 = time.perf_counter()
            if phases is not None:
                for key, dt in (
                    ("sample", t1 - t0),
                    ("forward", t2 - t1),
                    ("backward", t3 - t2),
                    ("optimizer", t4 - t3),
                ):
                    phases[key] += dt

        return step, model, cfg

    def throughput(step, steps: int) -> float:
        for _ in range(args.warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return steps * n / (time.perf_counter() - t0)

    step, model, cfg = make_step(args.arch)
    rate_before = matmul_rate(device=dev)  # (the rate of the device trained on)
    tps = throughput(step, args.steps)
    phases = dict.fromkeys(("sample", "forward", "backward", "optimizer"), 0.0)
    for _ in range(max(args.steps // 2, 5)):
        step(phases)
    other = "paper" if args.arch == "valid" else "valid"
    ref_tps = (
        throughput(make_step(other)[0], args.reference_steps) if args.reference_steps else None
    )
    rate_after = matmul_rate(device=dev)

    enc = model.flops_per_patch("encoder")
    dec = model.flops_per_patch("decoder")
    per_triplet = 3 * (3 * enc + cfg.mc_samples * dec)
    achieved = per_triplet * tps
    matmul = max(rate_before, rate_after)
    print(
        f"device {dev}, threads {torch.get_num_threads()}, arch {args.arch}, batch {n}, K {cfg.mc_samples}"
    )
    print(
        f"model: {model.num_parameters():,} parameters, m = {cfg.patch_size}, "
        f"encoder {enc / 1e6:.1f} MFLOP/patch, decoder {dec / 1e6:.1f} MFLOP/patch"
    )
    print(
        f"matmul float32: {rate_before / 1e9:.0f} GFLOP/s before, {rate_after / 1e9:.0f} GFLOP/s after"
    )
    print(f"training: {tps:.1f} triplets/s ({args.steps} steps of {n})")
    print(
        f"FLOPs: {per_triplet / 1e6:.1f} MFLOP per triplet (fwd + bwd), {achieved / 1e9:.1f} GFLOP/s "
        f"= {achieved / matmul:.1%} of the matmul rate"
    )
    total = sum(phases.values())
    print(
        "time per step by phase: "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in phases.items())
        + f" (of {total / max(args.steps // 2, 5) * 1e3:.0f} ms)"
    )
    if ref_tps is not None:
        print(
            f"reference, --arch {other} in the same run: {ref_tps:.1f} triplets/s; "
            f"ratio {args.arch}/{other} = {tps / ref_tps:.2f}x"
        )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
