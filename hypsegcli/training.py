"""Training loop: triplets drawn fresh every step, checkpoints, resume, loss history.

The trainer is device-agnostic: volumes, model and sampling live on one
``torch.device``. Randomness flows from ``TrainConfig.seed`` through explicit
generators (model initialisation, triplet sampling, reparameterisation noise),
and their states are stored in every checkpoint, so a resumed run draws the
triplets an uninterrupted run would have drawn.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs on every rank with
DistributedDataParallel (see :mod:`hypsegcli.distributed`): ``batch_size`` is
per rank (each step sees ``batch_size * world_size`` triplets), rank r seeds its
triplet and noise generators with :func:`stream_seed` (rank 0, like a single
process, with ``seed + 1`` and ``seed + 2``; other ranks with seeds drawn from
``seed`` and ``r``, which no rank of another seed shares), the reported
losses are means over the ranks, and rank 0 alone writes the files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io as _stdio
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed
from .config import ModelConfig, SamplingConfig, TrainConfig, recorded_grad_clip
from .errors import BadInputError, HypsegError, Terminated, signals_held
from .io import write_text_atomic
from .modelfile import (
    first_non_finite,
    load_model_file,
    malformed_checkpoint,
    save_model_file,
)

log = logging.getLogger(__name__)

#: ``train --mask``: a mask in which fewer than this share of the anchors drawn centre is
#: warned about (placing a batch of 64 triplets in a 100^3 volume took 0.10 s with a mask of
#: 1 in 1 300, 1.3 s with 1 in 21 000, 0.0008 s without a mask)
SLOW_MASK_SHARE = 1e-3

#: Loss terms of :meth:`HypVAE.loss` kept per step (texture is 0 when the term is off).
LOSS_FIELDS = ("total", "recon", "kl", "triplet", "texture")
HISTORY_FIELDS = ("step", "elapsed_s", *LOSS_FIELDS, "triplets_per_s")


@dataclass
class TrainingVolume:
    """A normalised training volume and where it came from."""

    name: str
    data: np.ndarray  # float32 [x, y, z], normalised
    sha256: str  # of the raw (un-normalised) data
    mask: np.ndarray | None = None  # bool [x, y, z]: anchors centre inside (train --mask)
    mask_sha256: str | None = None  # of the mask's inside
    mask_name: str | None = None  # the mask's file
    spacing: tuple[float, float, float] | None = None  # voxel size (recorded in the model)
    unit: str | None = None  # of ``spacing``: "mm", "Å", "voxel", ...


@dataclass
class TrainResult:
    model_path: Path
    checkpoint_path: Path
    history_path: Path
    step: int
    elapsed_seconds: float
    first: dict[str, float]
    last: dict[str, float]
    stopped_by: str
    world_size: int = 1
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "checkpoint": str(self.checkpoint_path),
            "history": str(self.history_path),
            "step": self.step,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "first_losses": _json_losses(self.first),
            "last_losses": _json_losses(self.last),
            "stopped_by": self.stopped_by,
            "world_size": self.world_size,
            "device": self.device,
        }


def _json_losses(losses: dict[str, float]) -> dict[str, float | None]:
    """Losses for JSON: a term an older history did not record (nan) becomes null."""
    return {k: (v if math.isfinite(v) else None) for k, v in losses.items()}


def companion_paths(model_path: Path) -> tuple[Path, Path]:
    """``model.pt`` -> (``model.ckpt.pt``, ``model.history.csv``)."""
    stem = model_path.name[: -len(model_path.suffix)] if model_path.suffix else model_path.name
    return model_path.with_name(f"{stem}.ckpt.pt"), model_path.with_name(f"{stem}.history.csv")


def _check_optimizer_shapes(optimizer: Any) -> None:
    """ValueError where a loaded optimizer's moment estimates are not shaped as their
    parameters (torch's ``load_state_dict`` does not compare them; the first step would
    fail on them)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if hasattr(value, "shape") and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"its {name} of shape {tuple(value.shape)} is for a parameter of "
                        f"shape {tuple(param.shape)}"
                    )


def load_checkpoint(model_path: Path) -> dict[str, Any]:
    """The training checkpoint beside ``model_path`` (``--resume``); BadInputError where
    there is none or the file is not a checkpoint."""
    ckpt_path, _ = companion_paths(model_path)
    if not ckpt_path.is_file():
        hint = (
            f"{model_path} is there without it: start over, replacing it, with --overwrite"
            if Path(model_path).exists()
            else "train without --resume first"
        )
        raise BadInputError(f"{ckpt_path}: no checkpoint to resume from ({hint})")
    state = load_model_file(ckpt_path)
    if state.get("kind") != "checkpoint" or "optimizer_state" not in state:
        raise BadInputError(f"{ckpt_path}: not a training checkpoint")
    problem = malformed_checkpoint(state)
    if problem is not None:
        raise BadInputError(f"{ckpt_path}: malformed training checkpoint ({problem})")
    return state


def resolve_device(name: str = "auto"):
    """``auto`` picks CUDA, then Apple MPS, then the CPU.

    Under torchrun (``WORLD_SIZE > 1``) ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``.
    """
    return distributed.per_rank_device(_resolve_device(name))


def _resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is available (try --device auto)")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise BadInputError("--device mps: Apple MPS is not available (try --device auto)")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise BadInputError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda:"):
        index = name[len("cuda:") :]
        if not index.isdigit():
            raise BadInputError(f"--device {name!r}: expected cuda:N with N a device number")
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {name}: no CUDA device is available (try --device auto)")
        if int(index) >= torch.cuda.device_count():
            raise BadInputError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0"
            )
    return torch.device(name)


def _warn_settings_kept(
    ckpt_path: Path, *pairs: tuple[Any, Any], asked: frozenset[str] | None = None
) -> None:
    """A resumed run keeps the checkpoint's model and sampling settings: name those this
    command line asked otherwise. ``asked``: the settings (configuration keys) the command
    line gave; None: every one (a caller that cannot tell given values from defaults)."""
    differ = []
    for kept, given in pairs:
        old, new = kept.to_dict(), given.to_dict()
        if old.get("geometry") == new.get("geometry") == "euclidean":
            old.pop("gyroconv"), new.pop("gyroconv")  # (read only in hyperbolic space)
        differ += [
            f"{key} {old[key]!r} (not {new[key]!r})"
            for key in old
            if new.get(key) != old[key] and (asked is None or key in asked)
        ]
    if differ:
        log.warning(
            "%s: --resume keeps the checkpoint's settings: %s",
            ckpt_path,
            ", ".join(differ),
        )


def stream_seed(seed: int, rank: int, stream: int) -> int:
    """The seed of a rank's generator ``stream`` (1: triplets, 2: reparameterisation
    noise): ``seed + stream`` on rank 0, as in a single process; on other ranks one drawn
    from ``SeedSequence([seed, rank, stream])``, so that no rank of one ``--seed`` draws
    what a rank of another draws (``seed + 1 + 2r`` gave rank 1 of seed 0 the triplets of
    seed 2)."""
    if rank == 0:
        return seed + stream
    state = np.random.SeedSequence([seed, rank, stream]).generate_state(1, np.uint64)
    return int(state[0]) >> 1  # (63 bits: torch's manual_seed takes any of them)


def _warn_volumes_differ(kept: Sequence[dict[str, Any]], volumes: Sequence[Any]) -> None:
    """A resumed run on other volumes or masks than its checkpoint's says which changed:
    above all a --mask left out of a resubmitted command line, after which anchors
    centre anywhere."""
    if [v["sha256"] for v in kept] != [v.sha256 for v in volumes]:
        log.warning("resuming on training volumes that differ from the checkpoint's")
    old = [v.get("mask_sha256") for v in kept]
    new = [v.mask_sha256 for v in volumes]
    if any(old) and not any(new):
        log.warning(
            "the checkpoint was trained with --mask masks and this run has none: from here "
            "on anchors centre anywhere in the volumes (give the same --mask to keep them)"
        )
    elif any(new) and not any(old):
        log.warning(
            "the checkpoint was trained without --mask: from here on anchors centre inside "
            "the masks"
        )
    elif old != new:
        log.warning("resuming with --mask masks that differ from the checkpoint's")


def train(
    volumes: Sequence[TrainingVolume],
    model_path: Path,
    *,
    model_config: ModelConfig,
    sampling_config: SamplingConfig,
    train_config: TrainConfig,
    device: str = "auto",
    resume: bool = False,
    checkpoint: dict[str, Any] | None = None,
    progress: Callable[..., None] | None = None,
    job: distributed.Distributed | None = None,
    starting: Callable[[], None] | None = None,
    asked: frozenset[str] | None = None,
) -> TrainResult:
    """Train the VAE on ``volumes`` and write the model, checkpoint and history.

    With ``resume`` the checkpoint beside ``model_path`` is loaded (its model
    and sampling configuration win over the given ones; ``checkpoint``: that
    file's contents where the caller has loaded it already, see
    :func:`load_checkpoint`) and training continues from its step until
    ``train_config.steps`` / ``max_minutes`` (counted for this run).

    Under torchrun every rank calls this with the same arguments; see the module
    docstring for what differs between ranks. ``job``: the torchrun job the caller has
    joined already (:func:`distributed.session`); without it this joins one.
    ``starting``: called once everything is checked and set up, before the first step
    (``train --overwrite`` removes the earlier run there, not before a refusal).
    ``asked``: the model, sampling and train settings (configuration keys) the command
    line gave, of which a resumed run warns where the checkpoint's differ; None: all.
    """
    dev = resolve_device(device)
    joined = contextlib.nullcontext(job) if job is not None else distributed.session(dev)
    with joined as dist:
        return _train(
            volumes,
            Path(model_path),
            model_config=model_config,
            sampling_config=sampling_config,
            train_config=train_config,
            dev=dev,
            dist=dist,
            checkpoint=(checkpoint or load_checkpoint(Path(model_path))) if resume else None,
            progress=progress if dist.is_main else None,
            starting=starting,
            asked=asked,
        )


def _train(
    volumes: Sequence[TrainingVolume],
    model_path: Path,
    *,
    model_config: ModelConfig,
    sampling_config: SamplingConfig,
    train_config: TrainConfig,
    dev: Any,
    dist: distributed.Distributed,
    checkpoint: dict[str, Any] | None,
    progress: Callable[..., None] | None,
    starting: Callable[[], None] | None = None,
    asked: frozenset[str] | None = None,
) -> TrainResult:
    import torch

    from .geometry import geoopt
    from .model import HypVAE
    from .sampling import TripletSampler

    progress = progress or (lambda *a, **k: None)
    ckpt_path, history_path = companion_paths(model_path)
    history: list[dict[str, float]] = []
    state = checkpoint
    if state is not None:
        kept_model = ModelConfig.from_dict(state["model_config"])
        kept_sampling = SamplingConfig.from_dict(state["sampling_config"])
        if dist.is_main:
            _warn_settings_kept(
                ckpt_path,
                (kept_model, model_config),
                (kept_sampling, sampling_config),
                asked=asked,
            )
            if train_config.steps is not None and train_config.steps <= int(state["step"]):
                log.warning(
                    "%s is at step %d already, --steps %d: nothing to train, the model is "
                    "written as it is",
                    ckpt_path,
                    int(state["step"]),
                    train_config.steps,
                )
        if train_config.steps is not None and train_config.steps <= int(state["step"]):
            # no step runs with this command line's batch size or rate: the records (and a
            # later --resume's notes) keep the checkpoint's
            kept_train = state.get("train_config", {})
            train_config = dataclasses.replace(
                train_config,
                **{
                    key: kept_train[key]
                    for key in ("batch_size", "lr")
                    if isinstance(kept_train.get(key), (int, float))
                },
            )
        model_config, sampling_config = kept_model, kept_sampling
        kept_seed = int(state.get("train_config", {}).get("seed", train_config.seed))
        if kept_seed != train_config.seed:
            if dist.is_main and (asked is None or "seed" in asked):
                log.warning(
                    "%s: --resume continues the checkpoint's random streams (seed %d, not %d)",
                    ckpt_path,
                    kept_seed,
                    train_config.seed,
                )
            train_config = dataclasses.replace(train_config, seed=kept_seed)
        if dist.is_main:
            _warn_volumes_differ(state.get("training_volumes", []), volumes)
        history = [row for row in _read_history(history_path) if row["step"] <= state["step"]]

    seed = train_config.seed
    init_gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=init_gen)))
        try:
            model = HypVAE(model_config)
        except (TypeError, ValueError) as exc:  # a checkpoint's settings edited by hand
            if state is None:
                raise
            raise BadInputError(
                f"{ckpt_path}: malformed training checkpoint (its model settings: {exc})"
            ) from None
    model.to(dev)
    sample_gen = torch.Generator(device=dev).manual_seed(stream_seed(seed, dist.rank, 1))
    noise_gen = torch.Generator(device=dev).manual_seed(stream_seed(seed, dist.rank, 2))
    tensors = [torch.from_numpy(np.ascontiguousarray(v.data)).to(dev) for v in volumes]
    try:
        sampler = TripletSampler(
            tensors,
            sampling_config,
            model_config.patch_size,
            generator=sample_gen,
            masks=[v.mask for v in volumes],
        )
    except BadInputError as exc:
        raise BadInputError(_name_volume(str(exc), volumes)) from None
    for i, share in enumerate(sampler.mask_acceptance):
        if dist.is_main and share is not None and share < SLOW_MASK_SHARE:
            log.warning(
                "%s: about 1 in %.0f anchors drawn centre inside it, so each triplet is drawn "
                "about that often: training will be slow (a larger mask is faster)",
                _name_volume(f"the mask of volume {i}", volumes),
                1 / share,
            )
    optimizer = geoopt.optim.RiemannianAdam(model.parameters(), lr=train_config.lr, amsgrad=True)
    step = 0
    elapsed_before = 0.0
    if state is not None:
        try:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer_state"])
            _check_optimizer_shapes(optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else repr(exc)
            raise BadInputError(
                f"{ckpt_path}: its weights or optimizer state do not fit its model ({first})"
            ) from None
        # torch's loader turns geoopt's integer step counters into float32
        # tensors, which changes the bias correction in the last bits
        for param_state in optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = int(param_state["step"].item())
        kept_lr = {float(group["lr"]) for group in optimizer.param_groups}
        if kept_lr != {train_config.lr}:  # --lr applies from here on (the state keeps the old)
            if dist.is_main:
                log.info(
                    "resuming with --lr %g (the checkpoint trained with %s)",
                    train_config.lr,
                    ", ".join(f"{v:g}" for v in sorted(kept_lr)),
                )
            for group in optimizer.param_groups:
                group["lr"] = train_config.lr
        kept_clip = recorded_grad_clip(state.get("train_config", {}))
        if (
            dist.is_main
            and (kept_clip is None or isinstance(kept_clip, (int, float)))
            and (kept_clip or None) != (train_config.grad_clip or None)
        ):
            log.info(
                "resuming with --grad-clip %g (the checkpoint trained with %g)",
                train_config.grad_clip or 0,
                kept_clip or 0,
            )
        kept_batch = state.get("train_config", {}).get("batch_size")
        if dist.is_main and kept_batch is not None and kept_batch != train_config.batch_size:
            log.info(
                "resuming with --batch-size %d (the checkpoint trained with %d)",
                train_config.batch_size,
                kept_batch,
            )
        step = int(state["step"])
        try:
            _restore_generators(state, dist, seed, step, sample=sample_gen, noise=noise_gen)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInputError(
                f"{ckpt_path}: malformed training checkpoint ('rng_state': {exc!r:.160})"
            ) from None
        _warm_up_torchscript(model, train_config, dev)
        elapsed_before = float(state.get("elapsed_seconds", 0.0))
        log.info("resuming from step %d of %s", step, ckpt_path)
    if starting is not None:
        starting()
    loss_fn = dist.wrap(model)

    target = train_config.steps
    deadline = (
        None
        if train_config.max_minutes is None
        else time.monotonic() + 60.0 * train_config.max_minutes
    )
    volume_meta = [
        {
            "name": v.name,
            "sha256": v.sha256,
            "shape": list(v.data.shape),
            **({"mask_sha256": v.mask_sha256} if v.mask_sha256 else {}),
            **({"spacing": list(v.spacing), "unit": v.unit} if v.spacing is not None else {}),
        }
        for v in volumes
    ]

    def payload(kind: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": kind,
            "model_config": model_config.to_dict(),
            "sampling_config": sampling_config.to_dict(),
            "train_config": train_config.to_dict(),
            "normalization": {
                "method": sampling_config.norm,
                "low": sampling_config.norm_low,
                "high": sampling_config.norm_high,
            },
            "training_volumes": volume_meta,
            "step": step,
            "elapsed_seconds": elapsed_before + (time.monotonic() - start),
            "world_size": dist.world_size,
            "state_dict": _to_cpu(model.state_dict()),
        }
        if kind == "checkpoint":
            doc["optimizer_state"] = _to_cpu(optimizer.state_dict())
            doc["rng_state"] = dict(rng_states[0])  # rank 0's, as a single process resumes
            if dist.enabled:
                doc["rng_state"]["ranks"] = rng_states
        return doc

    def generator_states() -> dict[str, Any]:
        return {"sample": sample_gen.get_state(), "noise": noise_gen.get_state()}

    def checkpoint(rng: dict[str, Any] | None = None) -> None:
        """Save the state after ``step``; ``rng``: the generators' states then, where they
        have drawn for the next step since (default: as they are now)."""
        nonlocal rng_states, saved_step
        # the loss and gradients are checked before each update, its result only at the next
        # step: an update that left NaN or infinite weights (a huge --lr on the last step,
        # say) must not become the checkpoint or the model file (the same on every rank)
        broken = first_non_finite(model.named_parameters())
        why = None if broken is None else f"the update left non-finite values in {broken}"
        if why is None and last_batch is not None:
            # finite but blown-up weights (--lr 1e10): the loss of the last batch with them, on
            # a generator of its own (the training streams stay as they are)
            with torch.no_grad():
                value = loss_fn(
                    last_batch.anchor,
                    last_batch.positive,
                    last_batch.negative,
                    generator=torch.Generator(device=dev).manual_seed(0),
                )["total"].detach()
            value = dist.average({"total": value})["total"]
            if not torch.isfinite(value):
                why = f"with the weights after it the loss is {float(value)}"
        if why is not None:
            raise HypsegError(
                f"training diverged at step {step} ({why}); "
                + _diverged_advice(ckpt_path, saved_step, step, sampling_config, model_config)
            )
        rng_states = dist.gather(rng or generator_states())  # every rank's, for an exact resume
        if dist.is_main:
            # the history first: a resume drops rows beyond the checkpoint's step, so an
            # interruption between the two writes leaves no gap in it
            _write_history(history_path, history)
            save_model_file(ckpt_path, payload("checkpoint"))
        saved_step = step

    rng_states: list[dict[str, Any]] = []
    # the step of the checkpoint in ckpt_path, if this run started from or wrote one
    saved_step: int | None = step if state is not None else None

    start = time.monotonic()
    first_step = step  # --max-minutes is checked after each step: every run does at least one
    model.train()
    stopped_by = "steps"
    window_start, window_steps = time.monotonic(), 0
    first_run_losses: dict[str, float] | None = None
    # the generators' states after the last finished step (they draw for the next one
    # before its update): what a checkpoint written mid-step must hold to resume exactly
    drawn_from: tuple[int, dict[str, Any]] | None = None
    last_batch: Any = None  # the last triplets drawn (checkpoint() checks the weights on them)
    # Under torchrun a signal must not stop a rank between two collectives: SIGTERM and
    # Ctrl-C are held for the whole run, every step the ranks vote on whether one of them
    # was sent one, and all of them checkpoint at the same step before they stop (a signal
    # that comes during the final save stops the job after it).
    held = signals_held() if dist.enabled else contextlib.nullcontext([])
    try:
        with held as caught:
            while True:
                if target is not None and step >= target:
                    stopped_by = "steps"
                    break
                time_up, signalled = dist.stop_votes(
                    deadline is not None and step > first_step and time.monotonic() >= deadline,
                    bool(caught),
                )
                if signalled:  # (only under torchrun: a single process raises KeyboardInterrupt)
                    stopped_by = "signal"
                    break
                if time_up:
                    stopped_by = "max-minutes"
                    break
                if not dist.enabled:  # (only single-process runs checkpoint mid-step)
                    drawn_from = (step, generator_states())
                try:
                    triplets = sampler.sample(train_config.batch_size)
                    last_batch = triplets
                except BadInputError as exc:  # a --mask anchors hardly ever centre in
                    message = _name_volume(str(exc), volumes)
                    if step > 0 and not dist.enabled:  # (checkpoint() gathers from every rank)
                        assert drawn_from is not None
                        checkpoint(drawn_from[1])
                        message += f"; the state after step {step} is in {ckpt_path}"
                    raise BadInputError(message) from None
                losses = loss_fn(
                    triplets.anchor, triplets.positive, triplets.negative, generator=noise_gen
                )
                total = losses["total"]
                report = dist.average({k: v.detach() for k, v in losses.items()})  # over the ranks
                if not torch.isfinite(report["total"]):
                    # the weights may be what broke (a finite but huge update): the last checkpoint
                    # is kept, not overwritten with them (it held NaN weights no --lr could resume)
                    raise HypsegError(
                        f"training diverged at step {step + 1} (loss is {float(report['total'])}); "
                        + _diverged_advice(
                            ckpt_path, saved_step, step, sampling_config, model_config
                        )
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), train_config.grad_clip or math.inf
                )
                if not torch.isfinite(grad_norm):  # the same on every rank (gradients are averaged)
                    # not applied, and not saved: weights with a finite loss but infinite gradients
                    # (after a huge update, say) are no state to resume from either
                    raise HypsegError(
                        f"training diverged at step {step + 1} (gradient norm {float(grad_norm):g}, "
                        "beyond float range); "
                        + _diverged_advice(
                            ckpt_path, saved_step, step, sampling_config, model_config
                        )
                    )
                # Ctrl-C or SIGTERM waits for the update and its history row (a state saved amid
                # them would not be one the run went through)
                with signals_held():
                    optimizer.step()
                    step += 1
                    window_steps += 1
                    now = time.monotonic()
                    row = {k: float(v) for k, v in report.items()}
                    rate = (
                        window_steps
                        * train_config.batch_size
                        * dist.world_size
                        / max(now - window_start, 1e-9)
                    )
                    history.append(
                        {
                            "step": step,
                            "elapsed_s": round(elapsed_before + now - start, 3),
                            **{k: row[k] for k in LOSS_FIELDS},
                            "triplets_per_s": round(rate, 2),
                        }
                    )
                if first_run_losses is None:
                    first_run_losses = {k: row[k] for k in LOSS_FIELDS}
                progress(
                    "train",
                    step,
                    target or 0,  # 0: no step target (--max-minutes only)
                    loss=row["total"],
                    recon=row["recon"],
                    kl=row["kl"],
                    triplet=row["triplet"],
                    **({"texture": row["texture"]} if model.cfg.texture_weight > 0 else {}),
                    tps=rate,
                )
                if now - window_start > 20.0:
                    window_start, window_steps = now, 0
                if step % train_config.checkpoint_every == 0:
                    checkpoint()
            if stopped_by == "signal":
                # every rank is here at the same step, with no draws made for the next one
                first = caught[0] if caught else None  # (another rank's signal: none here)
                caught.clear()  # raised below, not by the held block's end
                if step > (saved_step or 0):
                    checkpoint()
                    if dist.is_main:
                        log.warning(
                            "interrupted: the state after step %d is in %s (--resume)",
                            step,
                            ckpt_path,
                        )
                # no rank leaves before the checkpoint is written: torchrun stops the
                # others (SIGTERM) as soon as one has exited
                dist.barrier()
                raise KeyboardInterrupt() if first == signal.SIGINT else Terminated()
            if saved_step != step:  # (a periodic checkpoint may have saved this step already)
                checkpoint()
            if dist.is_main:
                save_model_file(model_path, payload("model"))
            distributed.debug_dump(
                dist, step=step, model=model, generators={"sample": sample_gen, "noise": noise_gen}
            )
            dist.barrier()  # no rank reports success before the model file exists
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a Slurm time limit): keep the work done
        if step > (saved_step or 0) and not dist.enabled:  # (checkpoint() gathers from all)
            # mid-step, the generators have drawn for the next step: their states from before
            with signals_held():  # a second Ctrl-C waits for the save
                checkpoint(drawn_from[1] if drawn_from and drawn_from[0] == step else None)
                log.warning(
                    "interrupted: the state after step %d is in %s (--resume)", step, ckpt_path
                )
        raise
    last = {k: history[-1][k] for k in LOSS_FIELDS} if history else {}
    return TrainResult(
        model_path,
        ckpt_path,
        history_path,
        step,
        elapsed_before + time.monotonic() - start,
        first_run_losses or last,
        last,
        stopped_by,
        dist.world_size,
        str(dev),
    )


def _warm_up_torchscript(model: Any, train_config: TrainConfig, dev: Any) -> None:
    """One throwaway training step on copies of the model and optimizer (resumed runs).

    geoopt's ball maths is TorchScript, whose profiling executor runs a
    function's first call as written and later calls as an optimised graph
    with its own symbolic gradients, which round differently in the last bits.
    An uninterrupted run takes its first step on the first path and all later
    steps on the second; a resumed process takes this step first, so that its
    steps too run on the optimised path and continue the run bit for bit. The
    model, optimizer and generators of the run are untouched.
    """
    import copy

    import torch

    from .geometry import geoopt

    scratch = copy.deepcopy(model)
    optimizer = geoopt.optim.RiemannianAdam(scratch.parameters(), lr=train_config.lr, amsgrad=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    m = scratch.cfg.patch_size
    patches = torch.rand((3, train_config.batch_size, 1, m, m, m), generator=gen, device=dev)
    scratch.loss(*patches, generator=gen)["total"].backward()
    if train_config.grad_clip:
        torch.nn.utils.clip_grad_norm_(scratch.parameters(), train_config.grad_clip)
    optimizer.step()


#: Above this curvature, the advice of a diverged run names --curvature too: geoopt's
#: Riemannian Adam turned the gyroplane offsets of a c = 90 ball into NaN after one step
#: at any --lr (c = 80 trained), as the ball's radius 1/√c leaves float32 little room.
_LARGE_CURVATURE = 10.0


def _diverged_advice(
    ckpt_path: Path,
    saved_step: int | None,
    step: int,
    sampling_config: SamplingConfig,
    model_config: ModelConfig,
) -> str:
    """What a diverged run (after ``step`` good steps) leaves, and what to do next."""
    fix = "a smaller --lr"
    if sampling_config.norm == "none":
        fix += " or scaled intensities (--norm percentile or zscore)"
    if model_config.hyperbolic and model_config.curvature > _LARGE_CURVATURE:
        fix += f" or a smaller --curvature (now {model_config.curvature:g})"
    if saved_step is None:
        return f"no checkpoint was written; train again with {fix}"
    if saved_step == step:  # the checkpoint holds the very weights that just failed
        return (
            f"the checkpoint (step {saved_step}, {ckpt_path}) holds the weights that failed; "
            f"train again with {fix}"
        )
    return (
        f"the last checkpoint (step {saved_step}) is kept in {ckpt_path}: --resume from it "
        f"with {fix}, or train again"
    )


def _restore_generators(
    state: dict[str, Any],
    dist: distributed.Distributed,
    seed: int,
    step: int,
    **generators: Any,
) -> None:
    """Set this rank's generators from a checkpoint's ``rng_state``.

    A checkpoint holds rank 0's states (``rng_state["sample"]``, ``["noise"]``)
    and, when written by a distributed run, every rank's (``["ranks"]``). Resumed
    on as many processes as wrote it, every rank continues its own streams
    exactly; otherwise rank 0 continues rank 0's streams and ranks > 0 re-seed
    from (seed, rank, step).
    """
    saved = state["rng_state"]
    ranks = saved.get("ranks") or [saved]
    if len(ranks) == dist.world_size:
        mine = ranks[dist.rank]
    elif dist.is_main:
        mine = saved
    else:
        mine = None
    if dist.is_main and len(ranks) != dist.world_size:
        log.warning(
            "the checkpoint was written by %d process(es), resuming on %d: "
            + (
                "rank 0 continues its generators, other ranks re-seed"
                if dist.world_size > 1
                else "this process continues rank 0's generators"
            )
            + ", so triplets differ from an uninterrupted run",
            len(ranks),
            dist.world_size,
        )
    for stream, (name, gen) in enumerate(generators.items(), start=1):
        if mine is not None:
            try:
                gen.set_state(mine[name].cpu())
                continue
            except (RuntimeError, ValueError):
                # A CPU generator's state does not fit a CUDA generator (nor the
                # reverse): a checkpoint written on another kind of device.
                if stream == 1:
                    log.warning(
                        "the checkpoint's random generators come from another kind of device "
                        "than %s: re-seeding them, so triplets differ from an uninterrupted run",
                        gen.device,
                    )
        entropy = np.random.SeedSequence([seed, dist.rank, step, stream])
        gen.manual_seed(int(entropy.generate_state(1, dtype=np.uint64)[0] >> 1))


def _name_volume(message: str, volumes: Sequence[TrainingVolume]) -> str:
    """Replace 'volume 3' in a sampler message with the file's name, and 'the mask of
    volume 3' with the mask's file and the volume's."""
    import re

    def repl(match: re.Match[str]) -> str:
        index = int(match.group(2))
        if not 0 <= index < len(volumes):
            return match.group(0)
        volume = volumes[index]
        if match.group(1) and volume.mask_name:
            return f"{volume.mask_name} (the mask of {volume.name})"
        return f"{match.group(1) or ''}{volume.name}"

    return re.sub(r"(the mask of )?volume (?:index )?(\d+)", repl, message)


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with plain CPU tensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        # plain tensors only (geoopt's ManifoldTensor would not load with weights_only=True)
        return obj.detach().cpu().as_subclass(torch.Tensor)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in HISTORY_FIELDS}
        )
    write_text_atomic(path, buffer.getvalue())


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    # rows that are not ours (a damaged or edited file: bytes that are not UTF-8, a step that
    # is not a whole number) are left out, as they would be by a reader of the CSV
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        for raw in csv.DictReader(handle):
            if raw.get("texture") is None:  # written before the column existed: not recorded
                raw["texture"] = "nan"
            try:
                row: dict[str, float] = {k: float(raw[k]) for k in HISTORY_FIELDS}
            except (KeyError, TypeError, ValueError):
                continue
            if not (math.isfinite(row["step"]) and row["step"] == int(row["step"]) >= 1):
                continue
            row["step"] = int(row["step"])
            rows.append(row)
    return rows
