"""Distributed data-parallel training under ``torchrun``: process group, ranks, collectives.

``torchrun --nproc-per-node N -m hypsegcli train ...`` starts N copies of the
command with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment;
``WORLD_SIZE > 1`` switches training to PyTorch DistributedDataParallel. Every
helper here is a no-op (or the identity) in a plain single process, so the
trainer calls them unconditionally and a run without torchrun computes
exactly what it computed before this module existed.

Conventions:

- backend: NCCL when the rank trains on a CUDA device, gloo on the CPU; a rank
  given ``--device auto`` or ``cuda`` trains on ``cuda:LOCAL_RANK``.
- rank 0 is the *main* rank: it alone writes files, logs (ranks > 0 log
  warnings and errors only) and reports progress.
- every collective waits at most ``HYPSEG_DIST_TIMEOUT`` seconds (default
  600) for the other ranks, so a rank that died does not leave the others
  hanging forever; failures of the collective layer become one-line
  :class:`HypsegError` messages naming the rank.
- ``HYPSEG_DEBUG_RANK_DUMP=DIR`` makes every rank write ``DIR/rank<r>.json``
  with SHA-256 digests of its final weights and generator states (tests use it
  to check that the ranks' weights agree and their triplet streams differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import BadInputError, HypsegError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "HYPSEG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
DEBUG_DUMP_ENV = "HYPSEG_DEBUG_RANK_DUMP"


# ----------------------------------------------------------------------------- environment


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInputError(f"{name}={raw!r}: expected an integer (torchrun sets it)") from None
    if value < 0:
        raise BadInputError(f"{name}={value}: should be >= 0")
    return value


def world_size() -> int:
    """Number of processes in the job (``WORLD_SIZE``, 1 without torchrun)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    """This process's global rank (``RANK``), 0 when not distributed."""
    return _env_int("RANK", 0) if is_distributed() else 0


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``), 0 when not distributed."""
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_main_process() -> bool:
    """True for rank 0 and for any process not started by torchrun."""
    return rank() == 0


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors only (call before logging starts)."""
    if not is_main_process():
        logger = logging.getLogger("hypsegcli")
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def per_rank_device(device: Any) -> Any:
    """``cuda`` (no index) becomes ``cuda:LOCAL_RANK`` when distributed; others unchanged.

    An explicit ``cuda:N`` is refused when torchrun starts several processes per
    node (``LOCAL_WORLD_SIZE > 1``): they would all share GPU N.
    """
    import torch

    if device.type != "cuda" or not is_distributed():
        return device
    if device.index is not None:
        if _env_int("LOCAL_WORLD_SIZE", 1) > 1:
            raise BadInputError(
                f"--device {device}: every process on this node would share one GPU; "
                "use --device cuda (or auto) and each rank takes cuda:LOCAL_RANK"
            )
        return device
    index = local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise BadInputError(
            f"LOCAL_RANK={index} but this node has {count} CUDA device(s): "
            f"start at most {count} process(es) per node (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", index)


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BadInputError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; the default is a plain single process.

    All methods are collectives when ``world_size > 1`` (every rank must call
    them, in the same order) and cheap identities otherwise.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: Any) -> Callable[..., dict[str, Any]]:
        """The loss function to train with: ``model.loss``, or the same through DDP.

        DistributedDataParallel synchronises gradients only for computations
        that go through its ``forward``, so the loss is wrapped in a module
        whose ``forward`` is ``model.loss``; gradients are averaged over the
        ranks during ``backward``.
        """
        if not self.enabled:
            return model.loss
        import torch
        from torch.nn.parallel import DistributedDataParallel

        class _Loss(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
                return self.inner.loss(*args, **kwargs)

        device = next(model.parameters()).device
        return DistributedDataParallel(
            _Loss(model),
            device_ids=[device.index] if device.type == "cuda" else None,
        )

    def stop_votes(self, main_flag: bool, any_flag: bool) -> tuple[bool, bool]:
        """``(rank 0's main_flag, whether any rank's any_flag is set)``, the same on every rank
        (one collective): e.g. "the time is up" as rank 0's clock says, and "a rank was sent
        SIGTERM or Ctrl-C", so that all ranks stop at the same step."""
        if not self.enabled:
            return main_flag, any_flag
        import torch
        import torch.distributed as dist

        votes = [1 if main_flag and self.is_main else 0, 1 if any_flag else 0]
        value = torch.tensor(votes, dtype=torch.int32, device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value[0].item()), bool(value[1].item())

    def average(self, values: dict[str, Any]) -> dict[str, Any]:
        """Mean over the ranks of a dict of scalar tensors (a non-finite value spreads)."""
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist

        keys = list(values)
        stacked = torch.stack([values[k].detach().float() for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= self.world_size
        return dict(zip(keys, stacked.unbind(0), strict=True))

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def start_together(self, failure: BaseException | None, identity: Any) -> None:
        """Before the first step: every rank has prepared (read its inputs and checkpoint)
        and read the same ones (``identity``, compared with rank 0's), or every rank stops.

        ``failure``: this rank's error while preparing (the caller raises it afterwards);
        the other ranks then raise an error naming this rank and its message (of the same
        kind: bad input stays bad input). One collective; nothing in a single process.
        """
        if not self.enabled:
            return
        error = None if failure is None else (isinstance(failure, BadInputError), str(failure))
        reports = self.gather((error, identity if failure is None else None))
        if failure is not None:
            return
        for other, (error, _) in enumerate(reports):
            if error is not None:
                bad, message = error
                raise (BadInputError if bad else HypsegError)(
                    f"rank {self.rank}: stopped, as rank {other} could not start: {message}"
                )
        if self.rank != 0 and reports[self.rank][1] != reports[0][1]:
            raise BadInputError(
                f"rank {self.rank}: {_identity_difference(reports[0][1], reports[self.rank][1])}; "
                "every rank must read the same files (a shared filesystem)"
            )
        if any(identity != reports[0][1] for _, identity in reports[1:]):
            raise BadInputError(
                f"rank {self.rank}: stopped, as another rank read other training data than "
                "rank 0 (every rank must read the same files, a shared filesystem)"
            )

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _device(self) -> Any:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


@contextlib.contextmanager
def session(device: Any) -> Iterator[Distributed]:
    """Join the torchrun job for the body (no-op without torchrun); always leave it.

    ``device``: the torch device this rank trains on (see :func:`per_rank_device`).
    Errors of the collective layer (a rank died, a timeout) are re-raised as
    one-line :class:`HypsegError` messages that name this rank.
    """
    size = world_size()
    if size <= 1:
        yield Distributed()
        return
    import torch
    import torch.distributed as dist

    job = Distributed(world_size=size, rank=rank(), local_rank=local_rank())
    if job.rank >= size:
        raise BadInputError(f"RANK={job.rank} should be < WORLD_SIZE={size}")
    if not dist.is_available():
        raise HypsegError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    import torch.distributed.nn  # noqa: F401  (before joining: see _leave)

    if device.type not in ("cpu", "cuda"):
        raise BadInputError(
            f"--device {device.type}: distributed training runs on cpu or cuda devices"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_seconds()
    try:
        try:
            dist.init_process_group(
                backend,
                timeout=timedelta(seconds=timeout),
                device_id=device if device.type == "cuda" else None,
            )
        except (dist.DistError, RuntimeError, ValueError) as exc:
            raise HypsegError(
                f"rank {job.rank}: could not join the distributed job "
                f"({backend}, {TIMEOUT_ENV}={timeout:g} s): {_first_line(exc)}"
            ) from None
        log.info(
            "distributed training on %d processes (%s); --batch-size is per process",
            job.world_size,
            backend,
        )
        try:
            yield job
        except RuntimeError as exc:  # torch.distributed.DistError is one too
            if not _is_collective_error(exc):
                raise
            raise HypsegError(
                f"rank {job.rank}: distributed training failed: {_first_line(exc)} "
                f"(did another rank fail, or wait longer than {TIMEOUT_ENV}={timeout:g} s?)"
            ) from None
    finally:
        _leave()


def _leave() -> None:
    """Leave the job so that its gloo worker threads are gone before the interpreter ends.

    A gloo worker frees a finished collective just after the rank has moved on; where that
    happens during the interpreter's shutdown (a loaded machine), freeing its tensors needs
    the GIL, the thread is stopped instead, and the rank aborts ("terminate called without
    an active exception", exit -6) after a successful run. Freeing the process group joins
    the workers first, but only once nothing holds it: ``torch.distributed.nn.functional``
    (imported by DDP) keeps the default group in its functions' default arguments when
    imported after joining (so :func:`session` imports it before), and the DDP wrapper of
    the training lives in a reference cycle until a collection.
    """
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    gc.collect()


def _identity_difference(main: dict[str, Any], mine: dict[str, Any]) -> str:
    """How this rank's training data (``pipeline._training_identity``) differs from rank 0's."""
    ours, theirs = mine["volumes"], main["volumes"]
    if len(ours) != len(theirs):
        return f"read {len(ours)} training volume(s), rank 0 read {len(theirs)}"
    for (name, sha, mask), (name0, sha0, mask0) in zip(ours, theirs, strict=True):
        if name != name0:
            return f"read {name} where rank 0 read {name0}"
        if sha != sha0:
            return f"read other voxels in {name} than rank 0"
        if mask != mask0:
            return f"read another mask for {name} than rank 0"
    return f"resumes from step {mine['step']}, rank 0 from step {main['step']}"


def _is_collective_error(exc: BaseException) -> bool:
    """A failure of the communication layer (gloo raises plain RuntimeErrors)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo", "Gloo", "NCCL", "ProcessGroup", "c10d"))


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error, without a leading ``[source.cc:123]`` location."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text.splitlines()[0])
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= 200 else line[:199] + "…"


# ----------------------------------------------------------------------------- debugging


def state_sha256(state: dict[str, Any]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and values (CPU bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def debug_dump(job: Distributed, *, step: int, model: Any, generators: dict[str, Any]) -> None:
    """With ``HYPSEG_DEBUG_RANK_DUMP=DIR``, write ``DIR/rank<r>.json`` (digests; every rank)."""
    folder = os.environ.get(DEBUG_DUMP_ENV, "").strip()
    if not folder:
        return
    from .io import write_text_atomic

    doc = {
        "rank": job.rank,
        "world_size": job.world_size,
        "step": int(step),
        "state_dict_sha256": state_sha256(model.state_dict()),
        **{
            f"{name}_rng_sha256": hashlib.sha256(
                gen.get_state().cpu().numpy().tobytes()
            ).hexdigest()
            for name, gen in generators.items()
        },
    }
    write_text_atomic(Path(folder) / f"rank{job.rank}.json", json.dumps(doc, indent=2) + "\n")
