"""Check the CUDA paths of hypseg on a machine with a GPU, and time them against its CPU.

Run from the repository root on a CUDA machine::

    python benchmarks/gpu_check.py [--workdir DIR]

It prints one line per check (numbers, and FAIL where a check does not hold) and
exits 1 if any check failed (2, checking nothing, where no CUDA device is visible):

1. ``hypseg synth`` a few volumes, ``hypseg train --device cuda`` and
   ``--device auto`` (must pick the GPU), ``hypseg embed`` / ``cluster`` /
   ``evaluate`` with ``--device cuda``; the same cached embeddings clustered
   with ``--device cpu`` (k-means, Potts prior, edge snap, intensity MRF) must
   give the same labels (at least 99.9% of voxels in every label volume);
2. the dense embedding of one volume on the GPU against the CPU path with the
   same model (max |difference| relative to the largest |mu|; TF32 convolutions
   are switched off for the comparison, so they agree to float32 rounding);
3. one training step's loss and gradients on the GPU against the CPU in float64;
4. ``torchrun --nproc-per-node 1`` training on cuda (NCCL process group);
5. speed: triplets/s of training and voxels/s of dense embedding on the GPU,
   with the CPU of the same machine in the same run as the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)


def hypseg(*args: str) -> dict:
    """Run ``hypseg -q ARGS``; its --json document, {} without --json or on failure."""
    proc = subprocess.run(
        [sys.executable, "-m", "hypsegcli", "-q", *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        check(
            False, f"hypseg {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
        return {}
    return json.loads(proc.stdout) if "--json" in args and proc.stdout.strip() else {}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible", file=sys.stderr)
        sys.exit(2)
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores",
        flush=True,
    )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hypseg-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "d"

    # 1. the CLI on cuda
    hypseg("synth", str(data), "--n", "6", "--seed", "1")
    s_cuda = hypseg(
        "train",
        str(data / "images"),
        "-o",
        str(work / "m.pt"),
        "--steps",
        str(args.steps),
        "--device",
        "cuda",
        "--json",
    )
    s_auto = hypseg(
        "train",
        str(data / "images"),
        "-o",
        str(work / "ma.pt"),
        "--steps",
        "20",
        "--device",
        "auto",
        "--json",
    )
    check(
        "cuda" in str(s_auto.get("device", "")), f"--device auto trained on {s_auto.get('device')}"
    )
    if "step" in s_cuda:
        print(
            f"     train --device cuda: {s_cuda['step']} steps in {s_cuda['elapsed_seconds']:.1f} s",
            flush=True,
        )
    hypseg(
        "embed",
        str(data / "images"),
        "-m",
        str(work / "m.pt"),
        "--device",
        "cuda",
        "--cache-dir",
        str(work / "cache"),
    )
    # cuda, then the same cached (GPU) embeddings clustered on the CPU: k-means, Potts prior,
    # snap and MRF must give the same labels on both devices (float64 k-means, seeded on the host)
    for device, out in (("cuda", "seg"), ("cpu", "seg_cpu")):
        hypseg(
            "cluster",
            str(data / "images"),
            "-m",
            str(work / "m.pt"),
            "--k",
            "2",
            "--k",
            "4",
            "--k",
            "8",
            "-o",
            str(work / out),
            "--device",
            device,
            "--cache-dir",
            str(work / "cache"),
        )
    import nibabel as nib

    agree, n_cmp = 1.0, 0
    for f in sorted((work / "seg").glob("*_k*.nii.gz")):
        g = work / "seg_cpu" / f.name
        if g.is_file():
            a = np.asarray(nib.load(f).dataobj)
            b = np.asarray(nib.load(g).dataobj)
            agree = min(agree, float((a == b).mean()))
            n_cmp += 1
    check(
        n_cmp > 0 and agree >= 0.999,
        f"cluster --device cuda vs cpu on the same embeddings: {n_cmp} label volumes, "
        f"lowest voxel agreement {agree:.5f}",
    )
    ev = hypseg("evaluate", str(work / "seg"), str(data / "labels"), "--json", "--no-hausdorff")
    if ev:
        print(
            f"     evaluate after {args.steps} GPU steps: {json.dumps(ev.get('summary', ev))[:400]}",
            flush=True,
        )

    # 2. dense embedding, GPU vs CPU, same model
    from hypsegcli import io
    from hypsegcli.embedding import embed_volume
    from hypsegcli.modelfile import build_model, load_model_file
    from hypsegcli.sampling import normalize_volume

    # (TF32 off for this comparison only: the timings below run as `hypseg embed` does)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(load_model_file(work / "m.pt")).eval()
    img = next(iter(sorted((data / "images").glob("*.nii.gz"))))
    x = normalize_volume(io.read_volume(img).data, 1, 99)
    e_cpu = embed_volume(model, x, patch_size=5)
    e_gpu = embed_volume(model.to("cuda"), x, patch_size=5)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    rel = float(np.abs(e_gpu - e_cpu).max() / np.abs(e_cpu).max())
    check(rel < 1e-4, f"dense embedding GPU vs CPU: max |diff| / max |mu| = {rel:.2e}")

    # 3. the triplet loss and its gradients in float64, GPU vs CPU (no sampling noise in it)
    from hypsegcli.config import ModelConfig
    from hypsegcli.model import HypVAE

    torch.manual_seed(0)
    m64 = HypVAE(ModelConfig()).double()
    batch = [torch.rand(8, 1, 10, 10, 10, dtype=torch.float64) for _ in range(3)]
    res = {}
    for dev in ("cpu", "cuda"):
        mdev = m64.to(dev)
        mdev.zero_grad()
        mu = [mdev.encode(b.to(dev))[0] for b in batch]
        loss = mdev.triplet_loss(*mu) + sum(m.square().sum() for m in mu)
        loss.backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in mdev.parameters() if p.grad is not None])
        res[dev] = (loss.item(), grads)
    dl = abs(res["cpu"][0] - res["cuda"][0])
    dg = float((res["cpu"][1] - res["cuda"][1]).abs().max() / res["cpu"][1].abs().max())
    check(
        dl < 1e-10 and dg < 1e-9,
        f"encoder loss + gradients float64 GPU vs CPU: |dloss| {dl:.1e}, max |dgrad| / max |grad| {dg:.1e}",
    )

    # 4. torchrun with NCCL
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            "-m",
            "hypsegcli",
            "-q",
            "train",
            str(data / "images"),
            "-o",
            str(work / "ddp.pt"),
            "--steps",
            "30",
            "--device",
            "cuda",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    ok = proc.returncode == 0 and (work / "ddp.pt").exists()
    check(
        ok,
        f"torchrun --nproc-per-node 1 --device cuda (NCCL): rc {proc.returncode}, {time.perf_counter() - t0:.1f} s"
        + ("" if ok else f": {proc.stderr.strip()[-600:]}"),
    )

    # 5. speed, GPU vs this machine's CPU
    for extra in ([], ["--batch-size", "512"]):
        for dev in ("cpu", "cuda"):
            if dev == "cpu" and extra:
                continue
            proc = subprocess.run(
                [
                    sys.executable,
                    "benchmarks/train_speed.py",
                    "--device",
                    dev,
                    "--steps",
                    "20",
                    *extra,
                ],
                capture_output=True,
                text=True,
            )
            lines = [ln for ln in proc.stdout.splitlines() if "triplets/s" in ln]
            print(
                f"     train_speed {dev} {' '.join(extra)}: {lines[:2] if lines else proc.stderr[-300:]}",
                flush=True,
            )
    big = np.random.default_rng(0).random((160, 160, 160), dtype=np.float32)
    for dev in ("cpu", "cuda"):
        mdl = model.to(dev)
        embed_volume(mdl, big[:40, :40, :40], patch_size=5)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        embed_volume(mdl, big, patch_size=5)
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(
            f"     dense embedding 160^3 on {dev}: {dt:.2f} s = {big.size / dt:,.0f} voxels/s",
            flush=True,
        )
    print(f"{len(FAILED)} check(s) failed" if FAILED else "all checks passed", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
