"""The use cases behind the commands: files in, files out, core modules in between.

Functions here take paths and plain options, report progress through an
optional ``progress(stage, done, total, **info)`` callback, and return
JSON-ready summaries. They never print.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import logging
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import BadInputError
from .io import (
    VolumeGeometry,
    array_sha256,
    case_name,
    collect_inputs,
    read_volume,
    volume_suffix,
    write_labels,
    write_text_atomic,
    write_volume,
)

log = logging.getLogger(__name__)

Progress = Callable[..., None]


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


# ----------------------------------------------------------------------------- synth


def parse_split(text: str) -> tuple[float, ...]:
    """``"80/20/20"`` -> (80, 20, 20): proportions of train/val/test (1 to 3 parts)."""
    try:
        parts = tuple(float(p) for p in text.replace(",", "/").split("/"))
    except ValueError:
        raise BadInputError(
            f"--split {text!r}: expected numbers separated by '/', e.g. 80/20/20"
        ) from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise BadInputError(f"--split {text!r}: expected 1 to 3 non-negative parts, e.g. 80/20/20")
    return parts


def split_counts(n: int, parts: tuple[float, ...]) -> list[int]:
    """Largest-remainder rounding of ``n`` items into the given proportions."""
    total = sum(parts)
    exact = [n * p / total for p in parts]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(parts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


SPLIT_NAMES = ("train", "val", "test")


def synth(
    out: Path,
    *,
    n: int = 20,
    size: int = 50,
    seed: int = 0,
    irregular: bool = False,
    fmt: str = "nifti",
    split: tuple[float, ...] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write ``n`` synthetic volumes with their 3-level labels and ``dataset.json``.

    Case ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so a case
    does not depend on ``n`` or the split, and the same seed gives the same bytes.
    """
    from . import synth as generator

    progress = progress or _noop
    if n < 1:
        raise BadInputError(f"--n {n}: should be >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out}: exists and is not a folder")
    if split is None:
        folders = [(out, list(range(n)))]
    else:
        counts = split_counts(n, split)
        bounds = np.cumsum([0, *counts])
        folders = [
            (out / SPLIT_NAMES[i], list(range(bounds[i], bounds[i + 1])))
            for i in range(len(counts))
        ]
    geometry = VolumeGeometry.default((size, size, size), format=fmt)  # type: ignore[arg-type]
    suffix = geometry.suffix
    description = generator.dataset_description()
    done = 0
    cases = []
    for folder, indices in folders:
        for i in indices:
            name = f"case_{i:03d}"
            case = generator.generate_case(
                np.random.default_rng([seed, i]), size, irregular=irregular
            )
            write_volume(
                folder / "images" / f"{name}{suffix}", case.image.astype(np.float32), geometry
            )
            for lvl, labels in sorted(case.labels.items()):
                write_labels(folder / "labels" / f"{name}_L{lvl}{suffix}", labels, geometry)
            cases.append({"case": name, "split": folder.name if split else None})
            done += 1
            progress("synth", done, n)
        meta = {
            **description,
            "classes": [
                {"level": c.level, "id": c.id, "name": c.name, "parent": c.parent}
                for c in generator.CLASSES
            ],
            "generator": f"hypseg {__version__} synth",
            "seed": seed,
            "size": [size, size, size],
            "irregular": irregular,
            "format": fmt,
            "cases": [f"case_{i:03d}" for i in indices],
        }
        write_text_atomic(folder / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return {
        "out": str(out),
        "n": n,
        "seed": seed,
        "size": size,
        "irregular": irregular,
        "format": fmt,
        "splits": {f.name if split else "all": len(idx) for f, idx in folders},
    }


# ----------------------------------------------------------------------------- evaluate

_K_SUFFIX = re.compile(r"^(?P<case>.+)_k(?P<k>\d+)$")
_L_SUFFIX = re.compile(r"^(?P<case>.+)_L(?P<level>\d+)$")


def _label_files(path: Path) -> list[Path]:
    if (
        path.is_dir()
        and (path / "labels").is_dir()
        and not any(volume_suffix(p) for p in path.iterdir())
    ):
        path = path / "labels"
    return collect_inputs([path], warn=lambda _msg: None)


def _find_dataset_json(truth: Path) -> dict[str, Any] | None:
    base = truth if truth.is_dir() else truth.parent
    for folder in (base, base.parent):
        candidate = folder / "dataset.json"
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError) as exc:
                raise BadInputError(f"{candidate}: not valid JSON ({exc})") from None
    return None


def _levels_by_k(dataset: dict[str, Any] | None) -> dict[int, int]:
    """Number of classes -> level, from dataset.json's class list."""
    if not dataset:
        return {}
    counts: dict[int, int] = {}
    for cls in dataset.get("classes", []):
        counts[int(cls["level"])] = counts.get(int(cls["level"]), 0) + 1
    return {k: lvl for lvl, k in counts.items()}


def pair_files(pred: Path, truth: Path, *, level: int | None = None) -> list[dict[str, Any]]:
    """Pair predictions with ground truth (rules in :func:`evaluate`)."""
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise BadInputError(f"{p}: no such file or folder")
    if pred.is_file() and truth.is_file():
        m = _K_SUFFIX.match(case_name(pred))
        lm = _L_SUFFIX.match(case_name(truth))
        return [
            {
                "case": case_name(pred) if not m else m.group("case"),
                "pred": pred,
                "truth": truth,
                "k": int(m.group("k")) if m else None,
                "level": int(lm.group("level")) if lm else level,
            }
        ]
    preds = _label_files(pred) if pred.is_dir() else [pred]
    truths = _label_files(truth) if truth.is_dir() else [truth]
    by_name = {case_name(t): t for t in truths}
    k_to_level = _levels_by_k(_find_dataset_json(truth))
    pairs = []
    unpaired = []
    for p in preds:
        name = case_name(p)
        k_match = _K_SUFFIX.match(name)
        k = int(k_match.group("k")) if k_match else None
        base = k_match.group("case") if k_match else name
        lvl = level if level is not None else (k_to_level.get(k) if k is not None else None)
        candidates = []
        if name in by_name:
            candidates.append(name)
        if lvl is not None:
            candidates.append(f"{base}_L{lvl}")
        candidates.append(base)
        target = next((c for c in candidates if c in by_name), None)
        if target is None:
            unpaired.append(p.name)
            continue
        lm = _L_SUFFIX.match(target)
        pairs.append(
            {
                "case": _L_SUFFIX.sub(r"\g<case>", target) if lm else base,
                "pred": p,
                "truth": by_name[target],
                "k": k,
                "level": int(lm.group("level")) if lm else lvl,
            }
        )
    if unpaired:
        log.warning(
            "no ground truth for %d prediction(s): %s%s",
            len(unpaired),
            ", ".join(unpaired[:5]),
            ", ..." if len(unpaired) > 5 else "",
        )
    if not pairs:
        raise BadInputError(
            f"no prediction in {pred} could be paired with ground truth in {truth} "
            "(expected matching case names, or <case>_k<K> with <case>_L<level>; try --level)"
        )
    return pairs


def evaluate(
    pred: Path,
    truth: Path,
    *,
    level: int | None = None,
    hausdorff: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score predicted label volumes against ground truth.

    Pairing: two files are compared directly. With folders, a prediction is
    compared with the ground-truth file of the same case name, or
    ``<case>_k<K>`` with ``<case>_L<level>`` where the level is ``level`` or the
    level of ``dataset.json`` (beside or above the ground truth) with K classes,
    or else with ``<case>``. A dataset folder holding ``labels/`` may be given
    as ``truth``.
    """
    from . import metrics

    progress = progress or _noop
    pairs = pair_files(pred, truth, level=level)
    dataset = _find_dataset_json(Path(truth))
    names = {(int(c["level"]), int(c["id"])): c["name"] for c in (dataset or {}).get("classes", [])}
    cases = []
    for i, pair in enumerate(pairs):
        p_vol = read_volume(pair["pred"])
        t_vol = read_volume(pair["truth"])
        if p_vol.data.shape != t_vol.data.shape:
            raise BadInputError(
                f"{pair['pred']} has shape {p_vol.data.shape} but {pair['truth']} has shape {t_vol.data.shape}"
            )
        try:
            score = metrics.score_case(
                _as_labels(p_vol.data, pair["pred"]),
                _as_labels(t_vol.data, pair["truth"]),
                t_vol.geometry.spacing,
                surface_distances=hausdorff,
            )
        except BadInputError as exc:
            raise BadInputError(f"{pair['pred']} vs {pair['truth']}: {exc}") from None
        result = score.to_dict()
        for cls in result["classes"]:
            cls["name"] = names.get((pair["level"], cls["class_id"])) if pair["level"] else None
        cases.append(
            {
                "case": pair["case"],
                "pred": str(pair["pred"]),
                "truth": str(pair["truth"]),
                "k": pair["k"],
                "level": pair["level"],
                "unit": t_vol.geometry.unit,
                **result,
            }
        )
        progress("evaluate", i + 1, len(pairs))
    groups: dict[tuple[Any, Any], list[float]] = {}
    for case in cases:
        groups.setdefault((case["level"], case["k"]), []).append(case["mean_dice"])
    summary = [
        {
            "level": lvl,
            "k": k,
            "n": len(values),
            "mean_dice": float(np.mean(values)),
            "std_dice": float(statistics.pstdev(values)) if len(values) > 1 else 0.0,
        }
        for (lvl, k), values in sorted(
            groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0)
        )
    ]
    return {"cases": cases, "summary": summary}


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise BadInputError(f"{path}: not a label volume (non-integer values)")
    if rounded.min(initial=0) < 0:
        raise BadInputError(f"{path}: not a label volume (negative values)")
    return rounded.astype(np.int64)


def write_evaluation_csv(report: dict[str, Any], path: Path) -> None:
    """One row per case and ground-truth class."""
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "case",
            "pred",
            "truth",
            "k",
            "level",
            "class_id",
            "class_name",
            "label",
            "dice",
            "hd",
            "hd95",
            "unit",
            "gt_voxels",
            "pred_voxels",
            "case_mean_dice",
        ]
    )
    for case in report["cases"]:
        for cls in case["classes"]:
            writer.writerow(
                [
                    case["case"],
                    case["pred"],
                    case["truth"],
                    case["k"] or "",
                    case["level"] or "",
                    cls["class_id"],
                    cls.get("name") or "",
                    "" if cls["label"] is None else cls["label"],
                    f"{cls['dice']:.6f}",
                    "" if cls["hd"] is None else f"{cls['hd']:.6f}",
                    "" if cls["hd95"] is None else f"{cls['hd95']:.6f}",
                    case["unit"],
                    cls["gt_voxels"],
                    cls["pred_voxels"],
                    f"{case['mean_dice']:.6f}",
                ]
            )
    write_text_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------- train


def load_training_volumes(
    inputs: list[Path], *, recursive: bool = False, low: float = 1.0, high: float = 99.0
) -> list[Any]:
    """Read and normalise training volumes; errors name the file."""
    from .sampling import normalize_volume
    from .training import TrainingVolume

    paths = collect_inputs(inputs, recursive=recursive)
    volumes = []
    for path in paths:
        vol = read_volume(path)
        volumes.append(
            TrainingVolume(
                name=str(path),
                data=normalize_volume(vol.data, low=low, high=high, name=str(path)),
                sha256=array_sha256(vol.data),
            )
        )
    return volumes


def train(
    inputs: list[Path],
    output: Path,
    *,
    model_config: Any,
    sampling_config: Any,
    train_config: Any,
    device: str = "auto",
    threads: int | None = None,
    resume: bool = False,
    recursive: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train on the volumes in ``inputs``; write ``output`` and its checkpoint and history."""
    from . import training

    set_threads(threads)
    volumes = load_training_volumes(
        inputs, recursive=recursive, low=sampling_config.norm_low, high=sampling_config.norm_high
    )
    log.info("training on %d volume(s), device %s", len(volumes), training.resolve_device(device))
    result = training.train(
        volumes,
        Path(output),
        model_config=model_config,
        sampling_config=sampling_config,
        train_config=train_config,
        device=device,
        resume=resume,
        progress=progress,
    )
    return {"volumes": len(volumes), **result.to_dict()}


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (``--threads``); None leaves torch's default."""
    if threads is None:
        return
    if threads < 1:
        raise BadInputError(f"--threads {threads}: should be >= 1")
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- embed


class LoadedModel:
    """A model file, its hash and the VAE built from it (on a device)."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        from .io import file_sha256
        from .modelfile import build_model, load_model_file
        from .training import resolve_device

        self.path = Path(path)
        self.document = load_model_file(self.path)
        self.sha256 = file_sha256(self.path)
        self.device = resolve_device(device)
        self.model = build_model(self.document, path=self.path).to(self.device)
        self.normalization = dict(self.document["normalization"])

    def normalize(self, data: np.ndarray, name: str) -> np.ndarray:
        from .sampling import normalize_volume

        norm = self.normalization
        if norm.get("method") != "percentile":
            raise BadInputError(f"{self.path}: unknown normalisation {norm.get('method')!r}")
        return normalize_volume(data, low=float(norm["low"]), high=float(norm["high"]), name=name)


def _embedding_params(model: LoadedModel, patch_size: int, stride: int) -> dict[str, Any]:
    return {
        "method": "dense-v1",
        "patch_size": int(patch_size),
        "stride": int(stride),
        "normalization": model.normalization,
        "dtype": "float32",
    }


def embed_one(
    volume: Any,
    model: LoadedModel,
    cache: Any,
    *,
    patch_size: int,
    stride: int,
    tile: int | None,
    progress: Progress,
) -> tuple[np.ndarray, bool]:
    """Embeddings of one volume, from the cache or computed (then cached). Returns (array, cached)."""
    from .cache import embedding_key
    from .embedding import embed_volume

    key = embedding_key(
        array_sha256(volume.data),
        model.sha256,
        _embedding_params(model, patch_size, stride),
        __version__,
    )
    hit = cache.get(key)
    if hit is not None:
        return hit, True
    data = model.normalize(volume.data, str(volume.path))
    kwargs: dict[str, Any] = {"patch_size": patch_size, "stride": stride, "device": model.device}
    if tile is not None:
        kwargs["tile"] = tile
    emb = embed_volume(
        model.model,
        data,
        progress=lambda _s, d, t, **_k: progress(f"embed {volume.name}", d, t),
        **kwargs,
    )
    cache.put(
        key,
        emb,
        {
            "volume": str(volume.path),
            "model": str(model.path),
            "patch_size": patch_size,
            "stride": stride,
        },
    )
    return emb, False


def embed(
    inputs: list[Path],
    model_path: Path,
    *,
    patch_size: int = 5,
    stride: int = 1,
    tile: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    cache_dir: Path | None = None,
    output: Path | None = None,
    recursive: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fill the embedding cache for ``inputs``; with ``output`` also write ``<case>.npy`` arrays.

    Each array is float32 of shape (X, Y, Z, d), indexed like the volume
    (``[x, y, z]``), holding the encoder's posterior mean for the patch centred
    on each voxel (points of the Poincaré ball for hyperbolic models).
    """
    from .cache import EmbeddingCache, resolve_cache_dir

    progress = progress or _noop
    _check_embedding_options(patch_size, stride)
    set_threads(threads)
    paths = collect_inputs(inputs, recursive=recursive)
    model = LoadedModel(model_path, device)
    cache = EmbeddingCache(resolve_cache_dir(cache_dir))
    rows = []
    for i, path in enumerate(paths):
        volume = read_volume(path)
        start = time.perf_counter()
        emb, cached = embed_one(
            volume, model, cache, patch_size=patch_size, stride=stride, tile=tile, progress=progress
        )
        row: dict[str, Any] = {
            "volume": str(path),
            "shape": list(emb.shape),
            "cached": cached,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if output is not None:
            target = Path(output) / f"{volume.name}.npy"
            _save_npy(target, np.asarray(emb, dtype=np.float32))
            row["output"] = str(target)
        rows.append(row)
        progress("volumes", i + 1, len(paths))
    return {
        "model": str(model_path),
        "cache": str(cache.root),
        "computed": sum(not r["cached"] for r in rows),
        "cached": sum(r["cached"] for r in rows),
        "volumes": rows,
    }


def _check_embedding_options(patch_size: int, stride: int) -> None:
    if patch_size < 1:
        raise BadInputError(f"--patch-size {patch_size}: should be >= 1")
    if stride < 1:
        raise BadInputError(f"--stride {stride}: should be >= 1")


def _save_npy(path: Path, array: np.ndarray) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


# ----------------------------------------------------------------------------- cluster


def _canonical_order_ball(centers: np.ndarray, c: float) -> np.ndarray:
    """Cluster order: by distance of the centroid from the origin, then by angle."""
    norms = np.linalg.norm(centers, axis=1)
    dist0 = 2.0 / np.sqrt(c) * np.arctanh(np.clip(np.sqrt(c) * norms, 0.0, 1.0 - 1e-12))
    angle = (
        np.arctan2(centers[:, 1], centers[:, 0]) if centers.shape[1] > 1 else np.zeros(len(centers))
    )
    return np.lexsort((angle, np.round(dist0, 9)))


def _canonical_order_line(centers: np.ndarray) -> np.ndarray:
    return np.lexsort(tuple(centers[:, j] for j in reversed(range(centers.shape[1]))))


class _Clusterer:
    """Fits k centroids on features and assigns labels, the same way for every feature kind."""

    def __init__(
        self, kind: str, *, curvature: float, n_init: int, fit_samples: int, seed: int, device: Any
    ) -> None:
        self.kind = kind
        self.curvature = curvature
        self.n_init = n_init
        self.fit_samples = fit_samples
        self.seed = seed
        self.device = device

    def fit(self, features: np.ndarray, k: int) -> np.ndarray:
        """Canonically ordered centroids (k, d) fitted on at most fit_samples points."""
        rng = np.random.default_rng([self.seed, k])
        if len(features) > self.fit_samples:
            features = features[np.sort(rng.choice(len(features), self.fit_samples, replace=False))]
        features = np.asarray(features, dtype=np.float64)
        if self.kind == "ball":
            from .kmeans import PoincareKMeans

            km = PoincareKMeans(
                n_clusters=k,
                n_init=self.n_init,
                random_state=int(rng.integers(2**31)),
                c=self.curvature,
                fit_samples=self.fit_samples,
            ).fit(features)
            centers = np.asarray(km.cluster_centers_, dtype=np.float64)
            return centers[_canonical_order_ball(centers, self.curvature)]
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=self.n_init, random_state=int(rng.integers(2**31))).fit(
            features
        )
        centers = np.asarray(km.cluster_centers_, dtype=np.float64)
        return centers[_canonical_order_line(centers)]

    def predict(self, features: np.ndarray, centers: np.ndarray) -> np.ndarray:
        if self.kind == "ball":
            from .kmeans import PoincareKMeans

            km = PoincareKMeans(n_clusters=len(centers), c=self.curvature)
            km.cluster_centers_ = centers
            return np.asarray(km.predict(features))
        out = np.empty(len(features), dtype=np.int64)
        for start in range(0, len(features), 1 << 20):
            chunk = np.asarray(features[start : start + (1 << 20)], dtype=np.float64)
            d2 = ((chunk[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
            out[start : start + len(chunk)] = d2.argmin(1)
        return out


def _intensity_features(data: np.ndarray, name: str) -> np.ndarray:
    from .sampling import normalize_volume

    return normalize_volume(data, name=name)[..., None]


def load_centroids(path: Path, ks: list[int], features: str) -> dict[int, np.ndarray]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read centroids ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != "hypseg-centroids":
        raise BadInputError(f"{path}: not a hypseg centroids file")
    if doc.get("features") != features:
        raise BadInputError(
            f"{path}: centroids are for --features {doc.get('features')}, not {features}"
        )
    pooled = {
        int(s["k"]): np.asarray(s["centers"], dtype=np.float64)
        for s in doc.get("sets", [])
        if s.get("case") is None
    }
    missing = [k for k in ks if k not in pooled]
    if missing:
        raise BadInputError(
            f"{path}: no pooled centroids for k={', '.join(map(str, missing))} (fit them with --fit-on pooled)"
        )
    return pooled


def cluster(
    inputs: list[Path],
    out: Path,
    *,
    ks: list[int],
    model_path: Path | None = None,
    features: str = "embedding",
    fit_on: str = "volume",
    centroids: Path | None = None,
    patch_size: int = 5,
    stride: int = 1,
    tile: int | None = None,
    n_init: int = 4,
    fit_samples: int = 200_000,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    cache_dir: Path | None = None,
    preview: bool = False,
    recursive: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segment each volume into k clusters for every k; write ``OUT/<case>_k<K>`` and centroids.

    Labels are numbered 0..k-1 canonically: hyperbolic embeddings by the
    centroid's distance from the origin of the ball (then by angle), Euclidean
    embeddings and intensities by the centroid's coordinates, so the same
    structure gets the same number across runs. ``fit_on="pooled"`` fits one
    set of centroids on all inputs together so numbers agree across volumes;
    ``centroids`` applies saved pooled centroids instead of fitting.
    """
    from .cache import EmbeddingCache, resolve_cache_dir
    from .preview import write_preview

    progress = progress or _noop
    if not ks:
        raise BadInputError("give at least one --k")
    bad = [k for k in ks if k < 2]
    if bad:
        raise BadInputError(f"--k {bad[0]}: should be >= 2")
    ks = sorted(dict.fromkeys(ks))
    if features not in ("embedding", "intensity"):
        raise BadInputError(f"--features {features!r}: expected embedding or intensity")
    if fit_on not in ("volume", "pooled"):
        raise BadInputError(f"--fit-on {fit_on!r}: expected volume or pooled")
    if features == "embedding" and model_path is None:
        raise BadInputError("--model is required with --features embedding")
    _check_embedding_options(patch_size, stride)
    set_threads(threads)
    paths = collect_inputs(inputs, recursive=recursive)
    out = Path(out)
    model = LoadedModel(model_path, device) if features == "embedding" else None
    kind = (
        "ball"
        if model is not None
        and model.document["model_config"].get("geometry", "hyperbolic") == "hyperbolic"
        else "line"
    )
    curvature = float(model.document["model_config"].get("curvature", 1.0)) if model else 1.0
    clusterer = _Clusterer(
        kind, curvature=curvature, n_init=n_init, fit_samples=fit_samples, seed=seed, device=device
    )
    cache = EmbeddingCache(resolve_cache_dir(cache_dir)) if model is not None else None

    def features_of(volume: Any) -> tuple[np.ndarray, bool]:
        if model is None:
            return _intensity_features(volume.data, str(volume.path)), False
        return embed_one(
            volume, model, cache, patch_size=patch_size, stride=stride, tile=tile, progress=progress
        )

    fixed: dict[int, np.ndarray] | None = None
    if centroids is not None:
        fixed = load_centroids(centroids, ks, features)
    elif fit_on == "pooled":
        per_volume = max(1, fit_samples // len(paths))
        rng = np.random.default_rng(seed)
        samples = []
        for i, path in enumerate(paths):
            feats, _ = features_of(read_volume(path))
            flat = np.asarray(feats).reshape(-1, feats.shape[-1])
            take = rng.choice(len(flat), min(per_volume, len(flat)), replace=False)
            samples.append(np.asarray(flat[np.sort(take)], dtype=np.float64))
            progress("pooled features", i + 1, len(paths))
        pooled = np.concatenate(samples)
        fixed = {}
        for k in ks:
            if len(pooled) < k:
                raise BadInputError(f"n_samples={len(pooled)} should be >= n_clusters={k}")
            fixed[k] = clusterer.fit(pooled, k)

    sets: list[dict[str, Any]] = []
    if fixed is not None:
        sets = [{"case": None, "k": k, "centers": fixed[k].tolist()} for k in ks]
    rows = []
    computed = 0
    for i, path in enumerate(paths):
        volume = read_volume(path)
        feats, cached = features_of(volume)
        computed += int(model is not None and not cached)
        flat = np.asarray(feats).reshape(-1, feats.shape[-1])
        written = []
        for k in ks:
            if fixed is not None:
                centers = fixed[k]
            else:
                if len(flat) < k:
                    raise BadInputError(
                        f"{path}: n_samples={len(flat)} should be >= n_clusters={k}"
                    )
                centers = clusterer.fit(flat, k)
                sets.append({"case": volume.name, "k": k, "centers": centers.tolist()})
            labels = clusterer.predict(flat, centers).reshape(volume.data.shape)
            target = out / f"{volume.name}_k{k}{volume.geometry.suffix}"
            write_labels(target, labels, volume.geometry)
            written.append(str(target))
            if preview:
                write_preview(
                    out / f"{volume.name}_k{k}.png", volume.data, labels, volume.geometry.spacing
                )
        rows.append({"volume": str(path), "outputs": written, "cached": bool(cached)})
        progress("cluster", i + 1, len(paths))
    centroid_doc = {
        "format": "hypseg-centroids",
        "features": features,
        "geometry": "poincare" if kind == "ball" else "euclidean",
        "curvature": curvature if kind == "ball" else None,
        "model": str(model_path) if model_path else None,
        "model_sha256": model.sha256 if model else None,
        "patch_size": patch_size if model else None,
        "order": "by distance from the origin, then angle" if kind == "ball" else "by coordinates",
        "sets": sets,
    }
    write_text_atomic(out / "centroids.json", json.dumps(centroid_doc, indent=2) + "\n")
    return {
        "out": str(out),
        "ks": ks,
        "features": features,
        "fit_on": "centroids" if centroids is not None else fit_on,
        "computed": computed,
        "volumes": rows,
    }
