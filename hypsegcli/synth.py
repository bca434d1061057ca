"""Biologically inspired hierarchical synthetic volumes, after the paper's Sec. 4.1.

An independent generator written from the paper's short description (a cryo-ET-like
cell, three levels of objects told apart by texture, size and shape, 50^3, 120
volumes, and a variant with perturbed boundaries): the authors published neither their
generator nor its appendix (A.5) with the paper, so these volumes look like theirs
only in kind, and scores on them are not directly comparable with the paper's tables.
Where a choice is ours, not the paper's: the particles outside the cell are a level-3
class under background (so level 3 has 8 classes with ice and particles split, and
level 1's background holds them), and every intensity, texture, PSF and noise level
below.

A pure generator (no file I/O): :func:`generate_case` draws one volume that
looks like a low-SNR cryo-electron tomogram of a cell, together with nested
ground-truth label maps at three levels of hierarchy. Everything random comes
from the ``numpy.random.Generator`` passed in, so one seed gives identical
bytes.

Label hierarchy (``CLASSES``; every class has exactly one parent one level up)::

    level 1 (2)      level 2 (4)         level 3 (8)
    0 background --- 0 background ------ 0 background   (vitreous ice)
                                     '--- 1 particles    (extracellular)
    1 cell ------+-- 1 cytoplasm ------- 2 cytosol
                 |                   '--- 3 vesicles
                 +-- 2 organelle_a ----- 4 a_matrix
                 |                   '--- 5 a_inclusions
                 '-- 3 organelle_b ----- 6 b_matrix
                                     '--- 7 b_granules

Generative model, for a volume of shape ``(X, Y, Z)`` (voxel ``i`` centred at
coordinate ``i``) and object scale ``s = (X*Y*Z)**(1/3) / 50`` (sizes below
are for 50^3; they scale with ``s``, so a 100^3 volume holds the same scene at
twice the resolution):

1. **Cell** (level 1): an ellipsoid with a random rotation, centred near the
   middle of the box (jitter +-4 %), semi-axes 0.78-0.92 of the half box size
   (about a third of the volume); it stretches with a non-cubic box.
2. **Organelles** (level 2), placed one by one, A and B alternately, at
   random inside the cell, at least 2 voxels from the cell boundary and 1
   voxel from each other along the axes (the gap is a 6-connected dilation, so
   two may touch at an edge or corner): 2-3 of kind A, elongated ellipsoids with semi-axes
   (9-11, 5-6, 5-6)*s, and 2-3 of kind B, near-spheres of radius 5.5-7*s
   (about 12 % of the cell together; an organelle that finds no room after 40
   random tries is skipped, which happens for ~18 % of them).
3. **Small structures** (level 3), near-spheres (each semi-axis within +-10 %
   of the radius) placed the same way inside their parent region, 1 voxel
   apart along the axes (they may touch at an edge or corner): 8-12 vesicles of radius 3-4*s in the cytoplasm, 12-20 particles of
   radius 1.8-2.6*s in the background, 1-2 inclusions of radius 2-2.6*s in
   each organelle A and 2-3 granules of radius 1.8-2.3*s in each organelle B.
   Radii are clamped to at least 1.5 voxels (a sphere of ~14 voxels); below
   about 24^3 (28^3 irregular) inclusions and granules may find no room and
   be absent, and below about 24^3 (36^3 irregular) all organelles of one
   kind may be (measured on 40 seeds per size: e.g. 1 and 2 of 40 volumes
   lack a kind at 20^3 and at 32^3 irregular, none at 24^3 regular and 36^3
   irregular).
4. **Noise-free intensity** (higher = denser): the mean of the level-3 class
   (``CLASS_MEAN_INTENSITY``) plus textures, each centred on its class (or
   organelle) so that the class mean is exactly the table value. Texture
   scales are fixed in voxels (not scaled with the box), so that they stay
   visible in the 5^3 patches the method embeds:

   - background, particles, inclusions, granules: fine grain (Gaussian-filtered
     white noise, sigma 0.7 voxel, std 0.08);
   - cytosol: blobs (sigma 1.2 voxels, std 0.15);
   - vesicles: bright 1-voxel shell (+0.25) around a darker lumen, balanced per
     vesicle so the vesicle mean equals the cytosol mean (the lumen's change is
     capped, so vesicles of only a few voxels, in volumes below about 30^3, stay
     brighter: 0.60 against 0.45 at 20^3);
   - a_matrix: lamellae (cristae-like), a sinusoid of period 5-6 voxels and
     amplitude 0.5 along a random direction per organelle;
   - b_matrix: speckle, sparse bright dots (2 % of voxels, blurred with sigma
     0.8 voxel, std 0.7 over the volume);
   - membranes: the outer 1-voxel shell of the cell and of every organelle is
     brighter (+0.3) and the next shell inwards darker by the amount that keeps
     the class mean unchanged (a bilayer-like, zero-mean profile).

   Class means: background 0, particles 0.7, inclusions and granules 0.9,
   cytosol, vesicles, a_matrix and b_matrix 0.45. So cytoplasm and both
   organelle kinds differ only by texture and by their small level-3
   structures (level-2 means 0.45, ~0.48, ~0.48), and intensity alone cannot
   solve levels 2 and 3.
5. **Acquisition**: Gaussian PSF (sigma 0.8 voxel, which also damps the
   textures), a weak linear intensity ramp (+-0.05 over the box, random
   direction) and additive white Gaussian noise (std 0.22): the per-voxel
   contrast-to-noise ratio of cell against background is about 2, that of the
   textures below 1.

Difficulty (mean matched Dice, Hungarian, background included, 50^3):
k-means on intensity alone with k = 2, 4, 8 gives about 0.77 / 0.30 / 0.13 at
levels 1 / 2 / 3 (both variants); k-means on seven hand-made local 5^3
texture features (box mean, smoothed value, local std, third moment, band-pass
energy, local max, kurtosis) about 0.93 / 0.56 / 0.27; a supervised classifier
on the same features about 0.98 / 0.79 / 0.51. So the levels are learnable
from local texture but not from intensity. Note that level-2 scores near 0.5
mean "background and cytoplasm right, organelles missed" (the two organelle
kinds are ~2 % of the volume each).

``irregular=True`` is the harder variant with perturbed, non-convex
boundaries: every object is the sublevel set
``rho(x) - 1 + a * n(x) < 0`` of its normalised ellipsoid radius ``rho``
(``rho = 1`` on the regular boundary) plus a smooth unit-variance random field
``n`` (Gaussian-filtered white noise), keeping the largest connected piece;
``a = 0.12`` with a field of sigma 5*s voxels for the cell (its convex hull
is then 7-15 % larger than the cell), ``a = 0.25`` with sigma 2*s for the
organelles and ``a = 0.2`` with the same field for the small structures.
The regular variant is ``a = 0``. The perturbed cell almost always reaches the
volume's faces (38 of 40 volumes of 50^3, 1.5 % of the face voxels on average;
regular: 2 of 40, under 0.1 %), so its membrane is open there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from scipy import ndimage as ndi

from hypsegcli.checks import is_whole
from hypsegcli.errors import BadInputError

__all__ = [
    "CLASSES",
    "CLASS_MEAN_INTENSITY",
    "MIN_SIZE",
    "N_CLASSES",
    "SynthCase",
    "SynthClass",
    "dataset_description",
    "generate_case",
    "parent_lut",
]

MIN_SIZE = 16
"""Smallest accepted side, in voxels, per axis."""

N_CLASSES: Mapping[int, int] = MappingProxyType({1: 2, 2: 4, 3: 8})
"""Number of classes per level (background included)."""


@dataclass(frozen=True)
class SynthClass:
    """One ground-truth class: ``parent`` is its id one level up (None at level 1)."""

    level: int
    id: int
    name: str
    parent: int | None


CLASSES: tuple[SynthClass, ...] = (
    SynthClass(1, 0, "background", None),
    SynthClass(1, 1, "cell", None),
    SynthClass(2, 0, "background", 0),
    SynthClass(2, 1, "cytoplasm", 1),
    SynthClass(2, 2, "organelle_a", 1),
    SynthClass(2, 3, "organelle_b", 1),
    SynthClass(3, 0, "background", 0),
    SynthClass(3, 1, "particles", 0),
    SynthClass(3, 2, "cytosol", 1),
    SynthClass(3, 3, "vesicles", 1),
    SynthClass(3, 4, "a_matrix", 2),
    SynthClass(3, 5, "a_inclusions", 2),
    SynthClass(3, 6, "b_matrix", 3),
    SynthClass(3, 7, "b_granules", 3),
)

_DESCRIPTIONS = {
    (1, 0): "everything outside the cell",
    (1, 1): "the cell, membrane included",
    (2, 0): "everything outside the cell",
    (2, 1): "cell interior outside organelles",
    (2, 2): "elongated organelles with lamellar (striped) texture",
    (2, 3): "round organelles with speckled texture",
    (3, 0): "vitreous ice, fine grain",
    (3, 1): "small dense extracellular particles",
    (3, 2): "cytosol, blobby texture",
    (3, 3): "vesicles: bright shell, dark lumen",
    (3, 4): "organelle A matrix, lamellae of period 5-6 voxels",
    (3, 5): "dense inclusions inside organelle A",
    (3, 6): "organelle B matrix, sparse bright speckle",
    (3, 7): "granules inside organelle B",
}

CLASS_MEAN_INTENSITY: Mapping[int, float] = MappingProxyType(
    {0: 0.0, 1: 0.7, 2: 0.45, 3: 0.45, 4: 0.45, 5: 0.9, 6: 0.45, 7: 0.9}
)
"""Mean of the noise-free intensity map per level-3 class (exact: textures are centred per class)."""

# Acquisition.
_PSF_SIGMA = 0.8
_NOISE_STD = 0.22
_RAMP = 0.05
# Textures (voxels, intensity units), fixed in voxels whatever the box size.
_GRAIN_SIGMA, _GRAIN_STD = 0.7, 0.08
_BLOB_SIGMA, _BLOB_STD = 1.2, 0.15
_LAMELLA_PERIOD, _LAMELLA_AMP = (5.0, 6.0), 0.5
_SPECKLE_DENSITY, _SPECKLE_SIGMA, _SPECKLE_STD = 0.02, 0.8, 0.7
_MEMBRANE = 0.3
_VESICLE_SHELL = 0.25
_VESICLE_MAX_RATIO = 4.0  # cap on |lumen change| / shell change for tiny vesicles
# Shapes (object sizes scale with s; cell in units of the half box size).
_CELL_AXES = (0.78, 0.92)
_CELL_JITTER = 0.04
_CELL_MARGIN = 2  # voxels between the cell boundary and organelles
_A_AXES = ((9.0, 11.0), (5.0, 6.0), (5.0, 6.0))
_B_RADIUS = (5.5, 7.0)
_N_A, _N_B = (2, 3), (2, 3)
_VESICLES, _VESICLE_RADIUS = (8, 12), (3.0, 4.0)
_PARTICLES, _PARTICLE_RADIUS = (12, 20), (1.8, 2.6)
_INCLUSIONS, _INCLUSION_RADIUS = (1, 2), (2.0, 2.6)
_GRANULES, _GRANULE_RADIUS = (2, 3), (1.8, 2.3)
_MIN_RADIUS = 1.5
_TRIES = 40
_MAX_OUTSIDE = 0.05  # irregular objects: largest share cut off by their region
# Irregular variant: amplitude and field sigma (times s).
_IRR_CELL = (0.12, 5.0)
_IRR_ORGANELLE = (0.25, 2.0)
_IRR_SMALL = 0.2

# level -> lookup table child id -> parent id
_PARENTS = {
    level: np.array(
        [c.parent for c in sorted((c for c in CLASSES if c.level == level), key=lambda c: c.id)],
        dtype=np.uint8,
    )
    for level in (2, 3)
}
_MEAN_LUT = np.array([CLASS_MEAN_INTENSITY[i] for i in range(N_CLASSES[3])], dtype=np.float32)


def parent_lut(level: int) -> np.ndarray:
    """Lookup table ``lut[id] = parent id`` from ``level`` (2 or 3) to ``level - 1``.

    ``parent_lut(3)[labels[3]]`` equals ``labels[2]`` for every generated case.
    """
    if level not in _PARENTS:
        raise BadInputError(f"level={level} should be 2 or 3")
    return _PARENTS[level].copy()


@dataclass(frozen=True)
class SynthCase:
    """One synthetic volume: ``image`` float32 ``[x, y, z]``, ``labels[level]`` uint8."""

    image: np.ndarray
    labels: dict[int, np.ndarray]


# ---------------------------------------------------------------------------
# geometry helpers


def _check_size(size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if is_whole(size):
        shape = (int(size),) * 3
    elif isinstance(size, (tuple, list)) and len(size) == 3 and all(is_whole(v) for v in size):
        shape = tuple(int(v) for v in size)
    else:
        raise BadInputError(f"size={size!r} should be an int or a tuple of 3 ints")
    if min(shape) < MIN_SIZE:
        raise BadInputError(f"size={size!r} should be >= {MIN_SIZE} voxels per axis")
    return shape  # type: ignore[return-value]


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random rotation matrix (Haar measure, det +1); columns are the object's axes."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit std (float32)."""
    f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    f -= f.mean()
    f /= max(float(f.std()), 1e-12)
    return f


def _rho(
    box: tuple[slice, ...],
    center: np.ndarray,
    axes: np.ndarray,
    rot: np.ndarray,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised ellipsoid radius ``rho = || diag(1/axes) R^T D (x - c) ||`` on a box.

    ``D = diag(scale)`` (default identity) maps voxel offsets into the frame
    where the ellipsoid is defined; ``rho <= 1`` is the regular ellipsoid.
    """
    grids = np.ogrid[box]
    d = [(g.astype(np.float32) - np.float32(c)) for g, c in zip(grids, center, strict=True)]
    if scale is not None:
        d = [di * np.float32(si) for di, si in zip(d, scale, strict=True)]
    r2 = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
    for j in range(3):
        u = rot[0, j] * d[0] + rot[1, j] * d[1] + rot[2, j] * d[2]
        r2 += (u / np.float32(axes[j])) ** 2
    return np.sqrt(r2)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


@dataclass
class _Obj:
    box: tuple[slice, ...]
    mask: np.ndarray  # bool, shape of the box
    center: np.ndarray
    rot: np.ndarray
    index: int  # position of its spec in the list passed to _place


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask`` (None if empty)."""
    box = []
    for axis in range(mask.ndim):
        any_ = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if any_.size == 0:
            return None
        box.append(slice(int(any_[0]), int(any_[-1]) + 1))
    return tuple(box)


def _place(
    rng: np.random.Generator,
    allowed: np.ndarray,
    specs: list[np.ndarray],
    field: np.ndarray | None,
    amp: float,
    gap: int,
) -> list[_Obj]:
    """Place objects (semi-axes in ``specs``) one by one inside ``allowed``.

    Candidate centres are random allowed voxels at least 0.8 * (smallest
    semi-axis) from the region's boundary (Euclidean distance transform of
    ``allowed`` at the start). A candidate is accepted when its mask lies
    inside the volume and at most ``_MAX_OUTSIDE`` of it lies outside
    ``allowed`` (that part is cut off; regular shapes must fit exactly up to
    the rasterisation). Accepted objects are removed from ``allowed`` (dilated
    by ``gap`` voxels with the 6-connected element), so later objects neither overlap
    nor share a face with them (they may touch at an edge or corner).
    ``allowed`` is modified in place.
    """
    shape = np.array(allowed.shape)
    placed: list[_Obj] = []
    region = _bbox(allowed)
    if region is None:
        return placed
    dist = np.zeros(allowed.shape, dtype=np.float32)
    dist[region] = ndi.distance_transform_edt(allowed[region])
    struct = ndi.generate_binary_structure(3, 1)
    for index, axes in enumerate(specs):
        rot = _rotation(rng)
        half = math.ceil(float(axes.max()) * (1.0 + 3.0 * amp)) + 1
        idx = np.flatnonzero(allowed & (dist >= 0.8 * float(axes.min())))
        if idx.size == 0:
            continue
        picks = rng.integers(0, idx.size, size=_TRIES)
        jitter = rng.uniform(-0.5, 0.5, size=(_TRIES, 3))
        for pick, jit in zip(picks, jitter, strict=True):
            center = np.array(np.unravel_index(idx[pick], allowed.shape), dtype=np.float64) + jit
            if not allowed.flat[idx[pick]]:
                continue
            lo = np.floor(center).astype(int) - half
            hi = np.floor(center).astype(int) + half + 1
            lo_c, hi_c = np.maximum(lo, 0), np.minimum(hi, shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c, strict=True))
            level = _rho(box, center, axes, rot) - 1.0
            if field is not None and amp > 0:
                level += np.float32(amp) * field[box]
            mask = level < 0
            n_in = int(mask.sum())
            if n_in == 0:
                continue
            # reject objects cut by the volume border
            if np.any(lo < 0) or np.any(hi > shape):
                nz = np.nonzero(mask)
                if any(
                    (lo[a] < 0 and nz[a].min() == 0)
                    or (hi[a] > shape[a] and nz[a].max() == mask.shape[a] - 1)
                    for a in range(3)
                ):
                    continue
            tolerance = _MAX_OUTSIDE if amp > 0 else 0.0
            outside = mask & ~allowed[box]
            if outside.sum() > tolerance * n_in:
                if amp == 0:
                    continue
                # stray pieces of an irregular shape may be what lies outside
                mask = _largest_component(mask)
                n_in = int(mask.sum())
                outside &= mask
                if outside.sum() > tolerance * n_in:
                    continue
            if outside.any() or amp > 0:
                mask = _largest_component(mask & ~outside)
            placed.append(_Obj(box, mask, center, rot, index))
            if gap:
                grown = ndi.binary_dilation(np.pad(mask, gap), struct, iterations=gap)
            else:
                grown = mask
            gbox = tuple(
                slice(max(b.start - gap, 0), min(b.stop + gap, n))
                for b, n in zip(box, allowed.shape, strict=True)
            )
            off = tuple(gap - (b.start - g.start) for b, g in zip(box, gbox, strict=True))
            sub = grown[
                tuple(slice(o, o + (g.stop - g.start)) for o, g in zip(off, gbox, strict=True))
            ]
            allowed[gbox] &= ~sub
            break
    return placed


def _radius_specs(
    rng: np.random.Generator, count: tuple[int, int], radius: tuple[float, float], s: float
) -> list[np.ndarray]:
    n = int(rng.integers(count[0], count[1] + 1))
    r = np.maximum(rng.uniform(radius[0], radius[1], size=n) * s, _MIN_RADIUS)
    stretch = rng.uniform(0.9, 1.1, size=(n, 3))
    return [np.maximum(ri * st, _MIN_RADIUS) for ri, st in zip(r, stretch, strict=True)]


def _shells(mask: np.ndarray, *, open_faces: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The outer 1-voxel shell of ``mask`` and the next shell inwards (6-connectivity).

    ``open_faces``: the array's faces are no surface (a cell the field of view cuts has
    no membrane along the cut); otherwise voxels on them are shell."""
    border = int(open_faces)
    e1 = ndi.binary_erosion(mask, border_value=border)
    e2 = ndi.binary_erosion(e1, border_value=border)
    return mask & ~e1, e1 & ~e2


def _add_balanced(
    img: np.ndarray, pos: np.ndarray, neg: np.ndarray, value: float, max_ratio: float = np.inf
) -> None:
    """Add ``+value`` on ``pos`` and ``-value * |pos| / |neg|`` on ``neg`` (sum unchanged)."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return
    img[pos] += np.float32(value)
    img[neg] -= np.float32(value * min(n_pos / n_neg, max_ratio))


def _add_centred(img: np.ndarray, mask: np.ndarray, texture: np.ndarray) -> None:
    """Add ``texture`` on ``mask`` minus its mean there (the class mean stays put)."""
    if mask.any():
        values = texture[mask]
        img[mask] += values - values.mean(dtype=np.float64).astype(np.float32)


def _paint(l3: np.ndarray, objs: list[_Obj], label: int, where: int | None = None) -> None:
    for o in objs:
        view = l3[o.box]
        m = o.mask if where is None else o.mask & (view == where)
        view[m] = label


# ---------------------------------------------------------------------------
# the generator


def _generate(
    rng: np.random.Generator, shape: tuple[int, int, int], irregular: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the level-3 label map and the noise-free intensity map (float32)."""
    s = float(np.prod(shape)) ** (1.0 / 3.0) / 50.0
    shp = np.array(shape, dtype=np.float64)

    if irregular:
        field_cell = _unit_field(rng, shape, _IRR_CELL[1] * s)
        field_obj = _unit_field(rng, shape, _IRR_ORGANELLE[1] * s)
    else:
        field_cell = field_obj = None

    # 1. cell: ellipsoid in coordinates scaled by the half box size
    center = (shp - 1.0) / 2.0 + rng.uniform(-_CELL_JITTER, _CELL_JITTER, size=3) * shp
    axes = rng.uniform(*_CELL_AXES, size=3)
    rot = _rotation(rng)
    full = tuple(slice(0, n) for n in shape)
    level = _rho(full, center, axes, rot, scale=2.0 / shp) - 1.0
    if field_cell is not None:
        level += np.float32(_IRR_CELL[0]) * field_cell
    cell = level < 0
    if irregular:
        cell = _largest_component(cell)

    # 2. organelles, A and B alternately (A first), so both kinds find room
    n_a = int(rng.integers(_N_A[0], _N_A[1] + 1))
    n_b = int(rng.integers(_N_B[0], _N_B[1] + 1))
    a_specs = [np.array([rng.uniform(lo, hi) for lo, hi in _A_AXES]) * s for _ in range(n_a)]
    b_specs = _radius_specs(rng, (n_b, n_b), _B_RADIUS, s)
    specs, kinds = [], []
    for i in range(max(n_a, n_b)):
        for kind, group in ((2, a_specs), (3, b_specs)):
            if i < len(group):
                specs.append(np.maximum(group[i], _MIN_RADIUS))
                kinds.append(kind)
    allowed = ndi.binary_erosion(cell, iterations=_CELL_MARGIN)
    amp_o = _IRR_ORGANELLE[0] if irregular else 0.0
    placed = _place(rng, allowed, specs, field_obj, amp_o, 1)
    org_a = [o for o in placed if kinds[o.index] == 2]
    org_b = [o for o in placed if kinds[o.index] == 3]

    l3 = np.zeros(shape, dtype=np.uint8)
    l3[cell] = 2
    _paint(l3, org_a, 4, where=2)
    _paint(l3, org_b, 6, where=2)

    # 3. small structures inside their parent regions
    amp_s = _IRR_SMALL if irregular else 0.0
    allowed = ndi.binary_erosion(l3 == 2)
    vesicles = _place(
        rng, allowed, _radius_specs(rng, _VESICLES, _VESICLE_RADIUS, s), field_obj, amp_s, 1
    )
    allowed = ndi.binary_erosion(l3 == 0)
    particles = _place(
        rng, allowed, _radius_specs(rng, _PARTICLES, _PARTICLE_RADIUS, s), field_obj, amp_s, 1
    )
    inner: list[tuple[_Obj, list[_Obj], int]] = []
    for org, (count, radius), label in [(o, (_INCLUSIONS, _INCLUSION_RADIUS), 5) for o in org_a] + [
        (o, (_GRANULES, _GRANULE_RADIUS), 7) for o in org_b
    ]:
        allowed = np.zeros(shape, dtype=bool)
        allowed[org.box] = ndi.binary_erosion(org.mask & (l3[org.box] == label - 1))
        found = _place(rng, allowed, _radius_specs(rng, count, radius, s), field_obj, amp_s, 1)
        inner.append((org, found, label))
    _paint(l3, vesicles, 3, where=2)
    _paint(l3, particles, 1, where=0)
    for _, found, label in inner:
        _paint(l3, found, label, where=label - 1)

    # 4. noise-free intensity: class means + zero-mean textures
    img = _MEAN_LUT[l3]
    grain = _unit_field(rng, shape, _GRAIN_SIGMA)
    blobs = _unit_field(rng, shape, _BLOB_SIGMA)
    dots = (rng.random(shape, dtype=np.float32) < _SPECKLE_DENSITY).astype(np.float32)
    speckle = ndi.gaussian_filter(dots, _SPECKLE_SIGMA, mode="wrap")
    speckle -= np.float32(_SPECKLE_DENSITY)  # the filter preserves the mean density
    speckle *= np.float32(_SPECKLE_STD / max(float(speckle.std()), 1e-12))
    for label in (0, 1, 5, 7):
        _add_centred(img, l3 == label, _GRAIN_STD * grain)
    _add_centred(img, l3 == 2, _BLOB_STD * blobs)
    _add_centred(img, l3 == 6, speckle)
    for o in org_a:
        grids = np.ogrid[o.box]
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        period = rng.uniform(*_LAMELLA_PERIOD)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        arg = (
            sum(ui * (g - ci) for ui, g, ci in zip(u, grids, o.center, strict=True))
            * (2.0 * np.pi / period)
            + phase
        )
        lamellae = np.broadcast_to(_LAMELLA_AMP * np.sin(arg), o.mask.shape).astype(np.float32)
        _add_centred(img[o.box], o.mask & (l3[o.box] == 4), lamellae)
    # membranes of the cell and organelles; vesicle shell/lumen
    pos, neg = _shells(l3 > 1, open_faces=True)  # (an irregular cell may cross the faces)
    _add_balanced(img, pos & (l3 == 2), neg & (l3 == 2), _MEMBRANE)
    for objs, label in ((org_a, 4), (org_b, 6)):
        for o in objs:
            lab = l3[o.box]
            pos, neg = _shells(o.mask & ((lab == label) | (lab == label + 1)))
            _add_balanced(img[o.box], pos & (lab == label), neg & (lab == label), _MEMBRANE)
    for o in vesicles:
        ves = o.mask & (l3[o.box] == 3)
        shell = ves & ~ndi.binary_erosion(ves)
        _add_balanced(img[o.box], shell, ves & ~shell, _VESICLE_SHELL, _VESICLE_MAX_RATIO)
    return l3, img


def _acquire(rng: np.random.Generator, clean: np.ndarray) -> np.ndarray:
    """PSF blur, weak linear ramp and white Gaussian noise (float32)."""
    shape = clean.shape
    img = ndi.gaussian_filter(clean, _PSF_SIGMA, mode="nearest")
    u = rng.standard_normal(3)
    u /= np.linalg.norm(u)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    ramp = sum(
        np.float32(ui * 2.0 / n) * (g.astype(np.float32) - np.float32((n - 1) / 2.0))
        for ui, g, n in zip(u, grids, shape, strict=True)
    )
    img += np.float32(_RAMP / math.sqrt(3.0)) * ramp
    img += np.float32(_NOISE_STD) * rng.standard_normal(shape, dtype=np.float32)
    return img.astype(np.float32, copy=False)


def generate_case(
    rng: np.random.Generator,
    size: int | tuple[int, int, int] = 50,
    *,
    irregular: bool = False,
) -> SynthCase:
    """Draw one synthetic volume and its label maps at levels 1, 2, 3.

    ``size`` is one side (cube) or ``(X, Y, Z)``, each >= ``MIN_SIZE``. The
    image is float32 ``[x, y, z]``, not normalised (1st-99th percentiles about
    -0.5..0.95, extremes about -1.3..3.5 from the speckle); labels are
    uint8 with ``labels[2] == parent_lut(3)[labels[3]]`` and
    ``labels[1] == parent_lut(2)[labels[2]]``. Only ``rng`` is used, so the
    same seed gives identical bytes. ``irregular=True`` perturbs every
    boundary (module docstring).
    """
    if not isinstance(rng, np.random.Generator):
        raise BadInputError(f"rng={type(rng).__name__} should be a numpy.random.Generator")
    shape = _check_size(size)
    l3, clean = _generate(rng, shape, bool(irregular))
    image = _acquire(rng, clean)
    l2 = _PARENTS[3][l3]
    l1 = _PARENTS[2][l2]
    return SynthCase(image=image, labels={1: l1, 2: l2, 3: l3})


def dataset_description() -> dict:
    """JSON-ready description: levels, classes (ids, names, parents) and the generator."""
    levels = []
    for level in (1, 2, 3):
        levels.append(
            {
                "level": level,
                "n_classes": N_CLASSES[level],
                "classes": [
                    {
                        "id": c.id,
                        "name": c.name,
                        "parent": c.parent,
                        "description": _DESCRIPTIONS[(c.level, c.id)],
                    }
                    for c in CLASSES
                    if c.level == level
                ],
            }
        )
    return {
        "name": "hypseg-synthetic-cells",
        "description": (
            "Biologically inspired hierarchical volumes resembling cryo-ET of cells, "
            "after Hsu, Gu et al., NeurIPS 2021, Sec. 4.1 (an independent generator: the "
            "authors published none, so scores are not directly comparable with the "
            "paper's): a cell holding two kinds of "
            "organelles, which hold smaller structures; classes differ in texture, "
            "size and shape, several share the same mean intensity; Gaussian PSF and "
            "white noise give a low SNR."
        ),
        "levels": levels,
        "generator": {
            "object_scale": "sizes scale with (X*Y*Z)**(1/3)/50; texture scales are fixed in voxels",
            "class_mean_intensity_level3": {
                c.name: CLASS_MEAN_INTENSITY[c.id] for c in CLASSES if c.level == 3
            },
            "textures": {
                "background/particles/inclusions/granules": f"grain sigma {_GRAIN_SIGMA}, std {_GRAIN_STD}",
                "cytosol": f"blobs sigma {_BLOB_SIGMA}, std {_BLOB_STD}",
                "vesicles": "bright shell, dark lumen, mean equal to cytosol",
                "a_matrix": f"lamellae period {_LAMELLA_PERIOD[0]}-{_LAMELLA_PERIOD[1]} voxels, amplitude {_LAMELLA_AMP}",
                "b_matrix": f"speckle density {_SPECKLE_DENSITY}, sigma {_SPECKLE_SIGMA}, std {_SPECKLE_STD}",
                "vesicle_shell": f"+{_VESICLE_SHELL} on the 1-voxel shell, lumen lowered to keep the cytosol mean (by at most {_VESICLE_MAX_RATIO} times the shell change)",
                "membranes": (
                    f"+{_MEMBRANE} on the outer 1-voxel shell of the cell and of every organelle, "
                    "the next shell inwards lowered by the amount that keeps the class mean "
                    "(none where a cell crosses the volume's faces)"
                ),
            },
            "shapes": {
                "units": "voxels at 50^3, times s = (X*Y*Z)**(1/3)/50 (not those named _voxels); the cell in half box sizes",
                "cell_semi_axes": list(_CELL_AXES),
                "cell_centre_jitter": _CELL_JITTER,
                "cell_margin_voxels": _CELL_MARGIN,
                "organelle_a": {"count": list(_N_A), "semi_axes": [list(a) for a in _A_AXES]},
                "organelle_b": {"count": list(_N_B), "radius": list(_B_RADIUS)},
                "vesicles": {"count": list(_VESICLES), "radius": list(_VESICLE_RADIUS)},
                "particles": {"count": list(_PARTICLES), "radius": list(_PARTICLE_RADIUS)},
                "inclusions_per_organelle_a": {
                    "count": list(_INCLUSIONS),
                    "radius": list(_INCLUSION_RADIUS),
                },
                "granules_per_organelle_b": {
                    "count": list(_GRANULES),
                    "radius": list(_GRANULE_RADIUS),
                },
                "min_radius_voxels": _MIN_RADIUS,
                "placement_tries": _TRIES,
            },
            "psf_sigma_voxels": _PSF_SIGMA,
            "noise_std": _NOISE_STD,
            "ramp_amplitude": _RAMP,
            "irregular": (
                "boundaries are the level set rho - 1 + a*n = 0 of the normalised ellipsoid "
                f"radius plus a smooth unit-variance field: a={_IRR_CELL[0]} (cell, field sigma "
                f"{_IRR_CELL[1]}*s), a={_IRR_ORGANELLE[0]} (organelles, sigma {_IRR_ORGANELLE[1]}*s), "
                f"a={_IRR_SMALL} (small structures)"
            ),
        },
    }
