"""Configuration value objects shared by the pipeline and the core modules.

Frozen dataclasses holding plain JSON types only, so that they can be stored
inside model files and manifests and read back without executing code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .errors import BadInputError

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadInputError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)  # type: ignore[call-arg]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss of the VAE (one class, switches for Table 2 rows).

    The encoder is ``len(channels)`` 3D convolutions (stride 1, ReLU) with the
    given kernels and paddings, then a fully connected head written as
    convolutions. Paddings of 0 (the default) make the encoder translation
    equivariant, so that dense inference equals per-patch inference exactly;
    ``kernels=(5, 5, 5, 5), paddings=(2, 1, 1, 0)`` is the authors' layout.
    """

    patch_size: int = 10
    channels: tuple[int, ...] = (16, 32, 64, 128)
    kernels: tuple[int, ...] = (3, 3, 3, 3)
    paddings: tuple[int, ...] = (0, 0, 0, 0)
    hidden: int = 300
    latent_dim: int = 2
    curvature: float = 1.0
    geometry: Literal["hyperbolic", "euclidean"] = "hyperbolic"
    gyroconv: bool = True
    triplet: bool = True
    beta: float = 8.0
    margin: float = 0.2
    mc_samples: int = 1
    triplet_distance: Literal["plain", "squared"] = "plain"
    likelihood: Literal["unit", "learned"] = "unit"
    texture_weight: float = 0.0
    #: Tangent standard deviation (per coordinate, in units of 1/√c) of the
    #: gyroplanes' initial offsets p; the default starts them near the origin.
    gyroplane_init: float = 0.05

    def __post_init__(self) -> None:
        if not (len(self.channels) == len(self.kernels) == len(self.paddings)) or not self.channels:
            raise BadInputError(
                f"channels={self.channels}, kernels={self.kernels} and paddings={self.paddings} "
                "should be non-empty and of equal length"
            )
        if self.geometry not in ("hyperbolic", "euclidean"):
            raise BadInputError(f"geometry={self.geometry!r} should be 'hyperbolic' or 'euclidean'")
        if self.triplet_distance not in ("plain", "squared"):
            raise BadInputError(
                f"triplet_distance={self.triplet_distance!r} should be 'plain' or 'squared'"
            )
        if self.likelihood not in ("unit", "learned"):
            raise BadInputError(f"likelihood={self.likelihood!r} should be 'unit' or 'learned'")
        if self.latent_dim < 1:
            raise BadInputError(f"latent_dim={self.latent_dim} should be >= 1")
        if not (self.texture_weight >= 0 and math.isfinite(self.texture_weight)):
            raise BadInputError(
                f"texture_weight={self.texture_weight} should be a finite number >= 0"
            )
        if not (self.curvature > 0 and math.isfinite(self.curvature)):
            raise BadInputError(f"curvature={self.curvature} should be a finite number > 0")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise BadInputError(f"beta={self.beta} should be a finite number >= 0")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise BadInputError(f"margin={self.margin} should be a finite number >= 0")
        if not (self.gyroplane_init >= 0 and math.isfinite(self.gyroplane_init)):
            raise BadInputError(
                f"gyroplane_init={self.gyroplane_init} should be a finite number >= 0"
            )
        if self.mc_samples < 1:
            raise BadInputError(f"mc_samples={self.mc_samples} should be >= 1")
        if self.trunk_output_size() < 1:
            smallest = self.patch_size + 1 - self.trunk_output_size()
            raise BadInputError(
                f"patch_size={self.patch_size} is too small for kernels={self.kernels} "
                f"and paddings={self.paddings} (the smallest is {smallest})"
            )

    @property
    def hyperbolic(self) -> bool:
        return self.geometry == "hyperbolic"

    @property
    def uses_gyroconv(self) -> bool:
        """The gyroplane layer only exists for a hyperbolic latent space."""
        return self.gyroconv and self.hyperbolic

    def trunk_output_size(self) -> int:
        """Side of the encoder trunk's output for an ``patch_size``^3 input."""
        size = self.patch_size
        for k, p in zip(self.kernels, self.paddings, strict=True):
            size = size + 2 * p - k + 1
        return size

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


# Per-volume intensity normalisations (``hypseg train --norm``; sampling.normalize)
NORMALIZATIONS = ("percentile", "zscore", "none")

#: Checkpoints written before ``--grad-clip`` existed clipped the gradients' norm to 10.
LEGACY_GRAD_CLIP = 10.0


def recorded_grad_clip(recorded: dict[str, Any]) -> Any:
    """The gradient clip a recorded ``train_config`` trained with: its ``grad_clip``, or
    :data:`LEGACY_GRAD_CLIP` where the record predates the option (not today's default)."""
    return recorded.get("grad_clip", LEGACY_GRAD_CLIP)


@dataclass(frozen=True)
class SamplingConfig:
    """Multi-scale triplet sampling (paper Sec. 4; METHOD.md "Triplet sampling").

    Anchor side r in [r_min, r_max] (uniform or log-uniform, clipped to the
    volume), positive child of side in [l_min, min(child_max, r - r_gap)] inside
    the anchor, negative of the child's side that does not overlap the anchor
    (anywhere in the volume, or within ``negative_gap`` voxels of the anchor's
    box per axis). ``norm`` (with percentile levels ``norm_low``/``norm_high``)
    is how every volume's intensities are scaled before sampling and at
    inference (:func:`hypsegcli.sampling.normalize`).
    """

    r_min: float = 5.0
    r_max: float = 34.0
    scale_sampling: Literal["uniform", "log"] = "log"
    l_min: float = 3.0
    r_gap: float = 2.0
    child_max: float = 14.0
    norm: Literal["percentile", "zscore", "none"] = "percentile"
    norm_low: float = 1.0
    norm_high: float = 99.0
    negative_gap: float | None = None

    def __post_init__(self) -> None:
        if self.scale_sampling not in ("uniform", "log"):
            raise BadInputError(
                f"scale_sampling={self.scale_sampling!r} should be 'uniform' or 'log'"
            )
        if not (0 < self.r_min <= self.r_max and math.isfinite(self.r_max)):
            raise BadInputError(f"r_min={self.r_min} should be > 0 and <= r_max={self.r_max}")
        if not 0 < self.l_min:
            raise BadInputError(f"l_min={self.l_min} should be > 0")
        if not self.l_min <= self.r_min - self.r_gap:
            raise BadInputError(
                f"r_min={self.r_min} should be >= {self.l_min + self.r_gap:g}: an anchor must "
                f"hold a positive child of side >= {self.l_min:g} (l_min) and "
                f"{self.r_gap:g} (r_gap) smaller"
            )
        if self.child_max < self.l_min:
            raise BadInputError(f"child_max={self.child_max} should be >= l_min={self.l_min}")
        if self.negative_gap is not None and not self.negative_gap >= 0:
            raise BadInputError(f"negative_gap={self.negative_gap} should be >= 0 (or None)")
        if self.norm not in NORMALIZATIONS:
            raise BadInputError(f"norm={self.norm!r} should be one of {', '.join(NORMALIZATIONS)}")
        if not 0 <= self.norm_low < self.norm_high <= 100:
            raise BadInputError(
                f"norm_low={self.norm_low} and norm_high={self.norm_high} should satisfy "
                "0 <= norm_low < norm_high <= 100"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how fast to train (``hypseg train`` options).

    Training stops at ``steps`` or after ``max_minutes``, whichever comes first
    (either may be None, not both). A checkpoint is written every
    ``checkpoint_every`` steps and at the end.
    """

    steps: int | None = 3000
    max_minutes: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 100
    #: The gradients' total norm is clipped to this before each update (None or 0: not).
    grad_clip: float | None = 0.0

    def __post_init__(self) -> None:
        if self.steps is None and self.max_minutes is None:
            raise BadInputError("give --steps or --max-minutes (or both)")
        if self.steps is not None and self.steps < 1:
            raise BadInputError(f"steps={self.steps} should be >= 1")
        if self.max_minutes is not None and not (
            self.max_minutes > 0 and math.isfinite(self.max_minutes)
        ):
            raise BadInputError(f"max_minutes={self.max_minutes} should be a finite number > 0")
        if self.batch_size < 1:
            raise BadInputError(f"batch_size={self.batch_size} should be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInputError(f"lr={self.lr} should be a finite number > 0")
        if self.checkpoint_every < 1:
            raise BadInputError(f"checkpoint_every={self.checkpoint_every} should be >= 1")
        if self.grad_clip is not None and not (
            self.grad_clip >= 0 and math.isfinite(self.grad_clip)
        ):
            raise BadInputError(f"grad_clip={self.grad_clip} should be a finite number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, {**data, "grad_clip": recorded_grad_clip(data)})
