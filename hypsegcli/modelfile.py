"""hypseg model files: self-describing, safe to load, written atomically.

A model file is a ``torch.save`` of a dict holding only plain types and
tensors, read back with ``torch.load(..., weights_only=True)``, so loading a
file shared by someone else never executes code from it. Fields:

``format`` ("hypseg-model"), ``format_version``, ``kind`` ("model" or
"checkpoint"), ``versions`` (hypseg, torch, geoopt), ``model_config``,
``sampling_config``, ``train_config``, ``normalization``, ``training_volumes``
(name, shape and content SHA-256 of each), ``step``, ``elapsed_seconds``,
``state_dict``; checkpoints add ``optimizer_state`` and ``rng_state`` so that
``hypseg train --resume`` continues where they stopped.
"""

from __future__ import annotations

import hashlib
import io as _stdio
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import __version__
from .checks import is_whole
from .errors import BadInputError
from .io import atomic_output, short_message

FORMAT = "hypseg-model"
FORMAT_VERSION = 1
COMPATIBLE_VERSIONS = (1,)


def versions() -> dict[str, str]:
    import torch

    from .geometry import geoopt

    return {
        "hypseg": str(__version__),
        "torch": str(torch.__version__),
        "geoopt": str(geoopt.__version__),
    }


def save_model_file(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format fields) to ``path`` atomically."""
    import torch

    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        **payload,
    }
    buffer = _stdio.BytesIO()
    torch.save(document, buffer)
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def load_model_file(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a hypseg model file without executing code from it."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such model file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != b"PK\x03\x04":  # torch.save's zip container; anything else is not ours
        raise BadInputError(f"{path}: not a hypseg model file (not a PyTorch file)")
    try:
        document = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc).lower():
            reason = "it holds Python objects, not only tensors and plain data"
        else:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
            reason = short_message(text) if text else type(exc).__name__
        raise BadInputError(f"{path}: not a hypseg model file ({reason})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a hypseg model file")
    version = document.get("format_version")
    if version not in COMPATIBLE_VERSIONS:
        made = document.get("versions")
        made_by = made.get("hypseg", "?") if isinstance(made, dict) else "?"
        raise BadInputError(
            f"{path}: model file format {version} (written by hypseg {made_by}) is not supported by "
            f"hypseg {__version__} (supports {', '.join(map(str, COMPATIBLE_VERSIONS))})"
        )
    for key in ("model_config", "state_dict", "normalization"):
        if key not in document:
            raise BadInputError(f"{path}: hypseg model file lacks '{key}'")
    problem = _malformed(document)
    if problem is not None:
        raise BadInputError(f"{path}: malformed hypseg model file ({problem})")
    weights = document["state_dict"]
    broken = first_non_finite(weights.items()) if isinstance(weights, dict) else None
    if broken is not None:
        raise BadInputError(
            f"{path}: weight {broken} holds NaN or infinite values (saved by a run "
            "that diverged); train again, with a smaller --lr"
        )
    return document


def _malformed(document: dict[str, Any]) -> str | None:
    """What is wrong with the fields every model file has (their types), or None."""
    import torch

    if not isinstance(document["model_config"], dict):
        return "'model_config' is not a mapping"
    weights = document["state_dict"]
    if not isinstance(weights, dict):
        return "'state_dict' is not a mapping of weights"
    for name, value in weights.items():
        if not isinstance(name, str) or not torch.is_tensor(value):
            return f"'state_dict' entry {name!r} is not a tensor"
    norm = document["normalization"]
    if not isinstance(norm, dict) or not isinstance(norm.get("method"), str):
        return "'normalization' is not a mapping with a method"
    if not all(_is_number(norm.get(key)) for key in ("low", "high")):
        return "'normalization' lacks numbers 'low' and 'high'"
    for key, kind in (("versions", dict), ("training_volumes", list)):
        if key in document and not isinstance(document[key], kind):
            return f"'{key}' is not a {'mapping' if kind is dict else 'list'}"
    return None


def malformed_checkpoint(state: dict[str, Any]) -> str | None:
    """What is wrong with the fields a training checkpoint adds (their types), or None."""
    for key, kind in (
        ("sampling_config", dict),
        ("optimizer_state", dict),
        ("rng_state", dict),
        ("train_config", dict),
    ):
        if not isinstance(state.get(key), kind):
            return f"'{key}' is missing or not a mapping"
    step = state.get("step")
    if not is_whole(step, 0):
        return f"'step' {step!r} is not a step count"
    optimizer = state["optimizer_state"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(
        optimizer.get("param_groups"), list
    ):
        return "'optimizer_state' lacks its state and parameter groups"
    if not all(
        isinstance(group, dict) and _is_number(group.get("lr"), positive=True)
        for group in optimizer["param_groups"]
    ):
        return "'optimizer_state' has a parameter group without a learning rate"
    train = state["train_config"]
    for key, ok in (
        ("seed", lambda v: is_whole(v, 0)),
        ("batch_size", lambda v: is_whole(v, 1)),
        ("lr", lambda v: _is_number(v, positive=True)),
    ):
        if key in train and not ok(train[key]):
            return f"'train_config' {key} {train[key]!r} is not a valid {key.replace('_', ' ')}"
    if "elapsed_seconds" in state and not _is_number(state["elapsed_seconds"]):
        return f"'elapsed_seconds' {state['elapsed_seconds']!r} is not a duration"
    volumes = state.get("training_volumes", [])
    if not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in volumes):
        return "'training_volumes' entries lack their sha256"
    return None


def _is_number(value: Any, *, positive: bool = False) -> bool:
    """A finite int or float (not a bool), at least 0 (above 0 with ``positive``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) and (value > 0 if positive else value >= 0)


def first_non_finite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor of ``(name, value)`` pairs (a state dict's
    items, a module's named parameters) holding NaN or infinite values, or None."""
    import torch

    for name, tensor in named:
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                return name
    return None


def build_model(document: dict[str, Any], *, path: str | os.PathLike[str] = "model"):
    """Instantiate the VAE stored in a loaded model file (weights included)."""
    from .config import ModelConfig
    from .model import HypVAE

    try:
        config = ModelConfig.from_dict(document["model_config"])
        model = HypVAE(config)
        model.load_state_dict(document["state_dict"])
    except BadInputError as exc:
        raise BadInputError(f"{path}: {exc}") from None
    except (RuntimeError, KeyError, TypeError) as exc:
        # torch's first line only says "Error(s) in loading state_dict for HypVAE:"; the
        # next names the first mismatch
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = short_message(" ".join(lines[:2]) if lines else exc, limit=300)
        raise BadInputError(
            f"{path}: model weights do not match its configuration ({first})"
        ) from None
    model.eval()
    return model


def model_content_sha256(document: dict[str, Any]) -> str:
    """SHA-256 of what a model file computes: its model configuration, normalisation and
    weights (not the file's bytes, which also record versions and training wall time)."""
    from .distributed import state_sha256

    digest = hashlib.sha256()
    for part in ("model_config", "normalization"):
        digest.update(json.dumps(document.get(part), sort_keys=True, default=str).encode())
        digest.update(b"|")
    digest.update(state_sha256(document["state_dict"]).encode())
    return digest.hexdigest()
