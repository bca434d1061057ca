"""The use cases behind the commands: files in, files out, core modules in between.

Functions here take paths and plain options, report progress through an
optional ``progress(stage, done, total, **info)`` callback, and return
JSON-ready summaries. They never print.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io as _stdio
import json
import logging
import math
import os
import re
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .batch import MANIFEST_NAME, Failures, Part, RunRecorder, Stopwatch, resolve_part, select_part
from .checks import is_whole
from .errors import BadInputError, HypsegError, signals_held
from .io import (
    SUPPORTED_SUFFIXES,
    VolumeGeometry,
    array_sha256,
    bids_key,
    bids_match,
    case_name,
    check_name_length,
    check_output_file,
    check_output_folder,
    check_unique_cases,
    collect_inputs,
    entry_path,
    exclusive_writer,
    geometry_record,
    geometry_sha256,
    lock_path,
    read_volume,
    remove_stale_temporaries,
    volume_suffix,
    write_labels,
    write_text_atomic,
    write_volume,
)

log = logging.getLogger(__name__)

Progress = Callable[..., None]

#: Voxels per chunk when ``cluster`` assigns labels (a few tens of MB at a time).
PREDICT_BLOCK = 1 << 22


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


def _select_part(
    items: list[Any], part: Part, *, key: Callable[[Any], str] = str, what: str = "volume"
) -> list[Any]:
    """This part's share of ``items`` (all of them without parts), logged."""
    selected = select_part(items, part, key=key)
    if part.split:
        log.info("%s: %d of %d %s(s)", part.describe(), len(selected), len(items), what)
        if not selected and part.source == "slurm":
            # the split is implicit: most likely every task of the array names its own
            # inputs, and all but one would do nothing and report success
            raise BadInputError(
                f"part {part.index} of {part.count} (from {part.detail}) has none of the "
                f"{len(items)} {what}(s): a Slurm array splits the inputs it is given among "
                "its tasks; if every task names its own inputs, pass --num-parts 1, or else "
                f"run an array of at most {len(items)} task(s)"
            )
        if not selected:
            log.warning(
                "part %d of %d has no %ss (%d in all): nothing to do",
                part.index,
                part.count,
                what,
                len(items),
            )
    return selected


# ----------------------------------------------------------------------------- synth


def parse_split(text: str) -> tuple[float, ...]:
    """``"80/20/20"`` -> (80, 20, 20): proportions of train/val/test (1 to 3 parts)."""
    try:
        parts = tuple(float(p) for p in text.replace(",", "/").split("/"))
    except ValueError:
        raise BadInputError(
            f"--split {text!r}: expected numbers separated by '/', e.g. 80/20/20"
        ) from None
    if (
        not 1 <= len(parts) <= 3
        or not all(np.isfinite(p) and p >= 0 for p in parts)
        or not 0 < sum(parts) < math.inf  # (QA: 1e308/1e308/1 summed to inf: a NaN split)
    ):
        raise BadInputError(
            f"--split {text!r}: expected 1 to 3 finite non-negative parts with a positive "
            "sum, e.g. 80/20/20"
        )
    return parts


def split_counts(n: int, parts: tuple[float, ...]) -> list[int]:
    """Largest-remainder rounding of ``n`` items into the given proportions."""
    total = sum(parts)
    exact = [n * p / total for p in parts]
    if not all(math.isfinite(e) for e in exact):  # parts near the float range: scaled first
        exact = [n * (p / total) for p in parts]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(parts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


SPLIT_NAMES = ("train", "val", "test")


def _check_no_stale_cases(
    out: Path, folders: list[tuple[Path, list[int]]], suffix: str, levels: list[int]
) -> None:
    """Refuse to synthesise into ``out`` where it holds volumes this run would not write (an
    earlier run with another --n, --split or --format): they would lie beside a
    dataset.json that does not list them. The same command again rewrites the same files."""
    writes = set()
    for folder, indices in folders:
        for i in indices:
            writes.add(folder / "images" / f"case_{i:03d}{suffix}")
            writes.update(folder / "labels" / f"case_{i:03d}_L{lvl}{suffix}" for lvl in levels)
    stale = []
    for folder in (out, *(out / name for name in SPLIT_NAMES)):
        for sub in ("images", "labels"):
            where = folder / sub
            if where.is_dir():
                stale += [
                    p
                    for p in sorted(where.iterdir())
                    if volume_suffix(p) and not p.name.startswith(".") and p not in writes
                ]
    if stale:
        names = _few([str(p.relative_to(out)) for p in stale], 3)
        raise BadInputError(
            f"{out}: holds {len(stale)} volume(s) this run would not write ({names}), left by "
            "an earlier synth with other options; synthesise into a new or empty folder"
        )


def _check_same_dataset(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse to synthesise into ``folder`` where its ``dataset.json`` records another seed,
    size, variant or format: the same case names would silently become another dataset."""
    path = folder / "dataset.json"
    if not path.is_file():
        return
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not all(key in meta for key in settings):
        raise BadInputError(
            f"{path}: not a dataset.json of hypseg synth; synthesise into a new or empty folder"
        )
    differ = [
        f"{key} {meta[key]!r} (this run: {value!r})"
        for key, value in settings.items()
        if meta[key] != value
    ]
    if differ:
        raise BadInputError(
            f"{path}: records another dataset ({', '.join(differ)}); its volumes would be "
            "replaced by different ones under the same names; synthesise into a new or empty "
            "folder"
        )


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
        for folder, indices in folders:
            if not indices:
                log.warning(
                    "--split: %s gets none of the %d volume(s); no %s folder is written",
                    folder.name,
                    n,
                    folder.name,
                )
        folders = [(folder, indices) for folder, indices in folders if indices]
    geometry = VolumeGeometry.default((size, size, size), format=fmt)  # type: ignore[arg-type]
    suffix = geometry.suffix
    _check_no_stale_cases(out, folders, suffix, sorted({c.level for c in generator.CLASSES}))
    settings = {"seed": seed, "size": [size, size, size], "irregular": irregular, "format": fmt}
    for folder, _ in folders:  # (with --split, OUT's own dataset.json is not synth's to judge)
        _check_same_dataset(folder, settings)
    for folder, _ in folders:  # made and probed for writing before the first volume
        check_output_folder(folder, what="synth")
        remove_stale_temporaries(folder, recursive=True)  # (a killed synth's, in images/...)
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
            # the program, and the generator's parameters (intensities, PSF, noise, ...)
            "generator": {"program": f"hypseg {__version__} synth", **description["generator"]},
            **settings,
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


def _label_files(path: Path, recursive: bool = False) -> list[Path]:
    if (
        path.is_dir()
        and (path / "labels").is_dir()
        and not any(volume_suffix(p) for p in path.iterdir())
    ):
        path = path / "labels"
    return collect_inputs([path], warn=lambda _msg: None, recursive=recursive)


def _find_dataset_json(truth: Path, *, level: int | None = None) -> dict[str, Any] | None:
    """The ``dataset.json`` of ``hypseg synth`` in the truth's folder or the one above it.

    Another tool's file of that name (nnU-Net, the Medical Segmentation Decathlon), or
    one that cannot be read, is skipped with a warning: pairing then goes by case name.
    Returns a dict whose ``classes`` is a list of {level, id, name} with integer level
    and id, or None.
    """
    base = truth if truth.is_dir() else truth.parent
    for folder in (base, base.parent):
        candidate = folder / "dataset.json"
        if not candidate.is_file():
            continue
        try:
            doc = json.loads(candidate.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: not read (%s); %s", candidate, exc, _without_dataset(level))
            continue
        classes = doc.get("classes") if isinstance(doc, dict) else None
        if isinstance(classes, list) and all(_synth_class(c) for c in classes):
            return doc
        log.warning(
            "%s: not a dataset.json of hypseg synth (no list of classes with level, id "
            "and name); ignored, %s",
            candidate,
            _without_dataset(level),
        )
    return None


def _without_dataset(level: int | None) -> str:
    return "pairing by case name" if level is None else f"pairing by case name and --level {level}"


def _synth_class(cls: Any) -> bool:
    """An entry of the class list of a ``hypseg synth`` dataset.json."""
    return (
        isinstance(cls, dict)
        and all(is_whole(cls.get(key)) for key in ("level", "id"))
        and isinstance(cls.get("name"), str)
    )


def _levels_by_k(dataset: dict[str, Any] | None) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Number of classes -> level, from dataset.json's class list; and the numbers of
    classes that several levels share (-> those levels), which name no level."""
    if not dataset:
        return {}, {}
    counts: dict[int, int] = {}
    for cls in dataset.get("classes", []):
        counts[int(cls["level"])] = counts.get(int(cls["level"]), 0) + 1
    levels: dict[int, list[int]] = {}
    for lvl, k in sorted(counts.items()):
        levels.setdefault(k, []).append(lvl)
    unique = {k: lvls[0] for k, lvls in levels.items() if len(lvls) == 1}
    return unique, {k: lvls for k, lvls in levels.items() if len(lvls) > 1}


def _few(names: list[str], n: int = 5) -> str:
    """The first ``n`` names, comma-separated, with ", ..." when there are more."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def pair_files(
    pred: Path,
    truth: Path,
    *,
    level: int | None = None,
    dataset: dict[str, Any] | None | bool = False,
    recursive: bool = False,
) -> list[dict[str, Any]]:
    """Pair predictions with ground truth (rules in :func:`evaluate`); ``dataset``: the
    truth's ``dataset.json`` where the caller has looked for it (:func:`_find_dataset_json`)."""
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise BadInputError(f"{p}: no such file or folder")
        if p.is_file() and volume_suffix(p) is None:
            raise BadInputError(
                f"{p}: not a label volume file (NIfTI or MRC: "
                f"{', '.join(SUPPORTED_SUFFIXES)}) or folder"
            )
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
    preds = _label_files(pred, recursive) if pred.is_dir() else [pred]
    truths = _label_files(truth, recursive) if truth.is_dir() else [truth]
    check_unique_cases(preds, why="the case would be scored twice")
    check_unique_cases(truths, why="which of them is the ground truth is ambiguous")
    by_name = {case_name(t): t for t in truths}
    if dataset is False:
        dataset = _find_dataset_json(truth, level=level)
    k_to_level, shared_k = _levels_by_k(dataset or None)
    if level is None and shared_k:
        used_k = {int(m.group("k")) for p in preds if (m := _K_SUFFIX.match(case_name(p)))}
        for k in sorted(used_k & set(shared_k)):
            log.warning(
                "dataset.json: levels %s all have %d classes, so a _k%d prediction names no "
                "level: such predictions are paired by case name only (give --level to "
                "choose)",
                ", ".join(map(str, shared_k[k])),
                k,
                k,
            )
    pairs = []
    unpaired = []
    guessed: list[str] = []  # paired with <case> for a missing <case>_L<level>
    levelled = {m.group("case") for n in by_name if (m := _L_SUFFIX.match(n))}
    ambiguous: list[str] = []
    contested: set[str] = set()  # ground truth named in ``ambiguous``
    unpaired_at: dict[int, set[str]] = {}
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
        target = next((c for c in candidates if c in by_name), None)
        if target is None:
            # BIDS derivatives: sub-01_desc-preproc_T1w_k4 with sub-01[_desc-aseg]_dseg, before
            # the image sub-01_desc-preproc_T1w itself where the folder holds both
            bids = bids_match(base, truths, "dseg")
            if len(bids) > 1:
                ambiguous.append(f"{p.name} ({', '.join(t.name for t in bids)})")
                contested.update(case_name(t) for t in bids)
                if k is not None:
                    unpaired_at.setdefault(k, set()).add(base)
                continue
            target = case_name(bids[0]) if bids else base if base in by_name else None
            if target == base and lvl is not None and base != name and base in levelled:
                # (the case has truths of other levels: which level <case> is, is a guess)
                guessed.append(f"{p.name} with {by_name[base].name} as level {lvl}")
        if target is None:
            unpaired.append(p.name)
            if k is not None:  # its ground truth is what is missing, not the prediction
                unpaired_at.setdefault(k, set()).add(base)
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
        log.warning("no ground truth for %d prediction(s): %s", len(unpaired), _few(unpaired))
    if guessed:
        log.warning(
            "%d prediction(s) paired with a truth named <case>, having no <case>_L<level>: %s",
            len(guessed),
            _few(guessed, 3),
        )
    if ambiguous:
        log.warning(
            "%d prediction(s) not scored, several BIDS dseg files fit each: %s (give the "
            "ground-truth file, or a folder holding one per case)",
            len(ambiguous),
            _few(ambiguous, 2),
        )
    if pairs and truth.is_dir() and pred.is_dir():
        # a truth case with no prediction at all (at any level) may be a failed segmentation
        # that would otherwise quietly raise the mean
        used = {case_name(pair["truth"]) for pair in pairs}
        scored = {_L_SUFFIX.sub(r"\g<case>", name) for name in used}
        # (of a BIDS folder only the dseg files are ground truth: not the images and masks
        # of an fMRIPrep anat folder, nor the dseg files the ambiguity warning names)
        cases = {
            _L_SUFFIX.sub(r"\g<case>", name)
            for name in by_name
            if name in used
            or (name not in contested and (bids_key(name) or ((), "dseg"))[1] == "dseg")
        }
        missing = sorted(cases - scored)
        if missing:
            log.warning(
                "no prediction for %d ground-truth case(s): %s (not scored)",
                len(missing),
                _few(missing),
            )
        # a case scored at some k but not at another k that other cases have (one output
        # lost or failed): that k's mean would quietly be over fewer cases
        cases_at: dict[int, set[str]] = {}
        for pair in pairs:
            if pair["k"] is not None:
                cases_at.setdefault(pair["k"], set()).add(pair["case"])
        every = set().union(*cases_at.values()) if cases_at else set()
        for k in sorted(cases_at):
            lacking = sorted(every - cases_at[k] - unpaired_at.get(k, set()))
            if lacking:
                log.warning(
                    "no prediction at k=%d for %d case(s) scored at other k: %s (the k=%d "
                    "scores are over the other %d case(s))",
                    k,
                    len(lacking),
                    _few(lacking),
                    k,
                    len(cases_at[k]),
                )
    shared: dict[tuple[str, int | None], list[str]] = {}
    for pair in pairs:
        shared.setdefault((str(pair["truth"]), pair["k"]), []).append(Path(pair["pred"]).name)
    twice = [(truth, names) for (truth, _), names in shared.items() if len(names) > 1]
    if twice:  # (BIDS: sub-01_T1w_k2 and sub-01_desc-preproc_T1w_k2 with sub-01_dseg)
        log.warning(
            "%d ground-truth file(s) scored against several predictions at one k, counting "
            "that case more than once in the means: %s",
            len(twice),
            "; ".join(f"{Path(t).name} ({', '.join(n)})" for t, n in twice[:2])
            + ("; ..." if len(twice) > 2 else ""),
        )
    if pairs and pred.is_dir():
        _warn_unrecorded(pairs)
    if not pairs:
        raise BadInputError(
            f"no prediction in {pred} could be paired with ground truth in {truth} "
            "(expected matching case names, or <case>_k<K> with <case>_L<level>; try --level)"
        )
    return pairs


def _warn_unrecorded(pairs: list[dict[str, Any]]) -> None:
    """Warn about ``<case>_k<K>`` predictions that ``cluster``'s per-case records beside them
    do not account for: a file not among the record's outputs (another k, or another size
    than the one written, left by an earlier run with other options), and records made with
    another model or other options than the first case's (two runs mixed in one folder).
    Predictions without a record (another tool's) are not checked."""
    records: dict[Path, Any] = {}
    stale: list[str] = []
    ways: list[tuple[dict[str, Any], str, list[str]]] = []  # (header, fit, cases)
    for pair in pairs:
        path = Path(pair["pred"])
        match = _K_SUFFIX.match(case_name(path))
        if pair["k"] is None or match is None:
            continue
        record_path = path.parent / f"{match.group('case')}{CASE_CENTROIDS_SUFFIX}"
        if record_path not in records:
            doc = _read_json(record_path) if record_path.is_file() else None
            ok = _is_case_record(doc)
            if not ok and record_path.is_file():
                log.warning(
                    "%s: not a centroid record as cluster writes it (damaged, or edited?); "
                    "the predictions of its case are not checked against it",
                    record_path,
                )
            records[record_path] = doc if ok else None
            if ok:
                for header, fit, cases in ways:
                    if fit == doc.get("fit") and _same_identity(header, doc["header"]):
                        cases.append(match.group("case"))
                        break
                else:
                    ways.append((doc["header"], doc.get("fit"), [match.group("case")]))
        doc = records[record_path]
        if doc is None:
            continue
        sizes = {s["k"]: s.get("bytes") for s in doc["sets"]}
        if pair["k"] not in sizes or sizes[pair["k"]] not in (None, _file_size(path)):
            stale.append(path.name)
    if stale:
        log.warning(
            "%d prediction(s) not written by the cluster run recorded beside them in "
            "<case>%s (left by an earlier run with other options?), scored anyway: %s",
            len(stale),
            CASE_CENTROIDS_SUFFIX,
            _few(stale),
        )
    if len(ways) > 1:
        first = ways[0][0]
        differ = sorted(
            {
                key
                for header, _, _ in ways[1:]
                for key in (*_IDENTITY, "model")
                if header.get(key) != first.get(key)
            }
            | ({"fit"} if len({fit for _, fit, _ in ways}) > 1 else set())
        )
        log.warning(
            "the predictions come from %d cluster runs made differently (%s differ between "
            "their records), scored together: %s",
            len(ways),
            ", ".join(differ) or "the model's weights",
            "; ".join(_few(cases, 3) for _, _, cases in ways),
        )


def grid_offset(a: VolumeGeometry, b: VolumeGeometry, *, voxels: bool = False) -> float:
    """Largest distance (world units) between where ``a`` and ``b`` put the same voxel index,
    over the corners of ``a``'s grid (the mappings are affine, so the corners bound it).

    ``voxels``: instead, the largest offset along any voxel axis of ``b``, in voxels of
    ``b`` (what "half a voxel apart" means on an anisotropic grid)."""
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, a.shape[0] - 1)
            for j in (0, a.shape[1] - 1)
            for k in (0, a.shape[2] - 1)
        ]
    )
    diff = corners @ (np.asarray(a.affine, float) - np.asarray(b.affine, float)).T
    if not voxels:
        return float(np.linalg.norm(diff[:, :3], axis=1).max())
    try:
        steps = np.linalg.solve(np.asarray(b.affine, float)[:3, :3], diff[:, :3].T)
    except np.linalg.LinAlgError:  # a degenerate affine: compare in world units per spacing
        return float(np.linalg.norm(diff[:, :3], axis=1).max() / min(b.spacing))
    return float(np.abs(steps).max())


def _warn_if_other_grid(
    pred: Path,
    p_geo: VolumeGeometry,
    truth: Path,
    t_geo: VolumeGeometry,
    use: str = "scored voxel by voxel",
) -> None:
    """Warn when a prediction and its ground truth share a shape but not a grid (files of the
    same format, not an MRC of unknown voxel size beside one of known size, whose affines
    put some voxel more than half a voxel apart):
    Dice compares them voxel by voxel all the same."""
    if p_geo.format != t_geo.format or (
        p_geo.unit != t_geo.unit and "voxel" in (p_geo.unit, t_geo.unit)
    ):
        # (an MRC of unknown voxel size, whose affine is in voxels, beside one in Å: the two
        # grids cannot be compared; a NIfTI of "unknown" units is taken to be in mm)
        return
    offset = grid_offset(p_geo, t_geo)
    if grid_offset(p_geo, t_geo, voxels=True) > 0.5:
        log.warning(
            "%s and %s have the same shape but different grids (a voxel up to %s apart); "
            "%s, check that they belong together",
            pred,
            truth,
            with_unit(f"{offset:.3g}", t_geo.unit),
            use,
        )


def evaluate(
    pred: Path,
    truth: Path,
    *,
    level: int | None = None,
    hausdorff: bool = True,
    csv_path: Path | None = None,
    num_parts: int | None = None,
    part_id: int | None = None,
    recursive: bool = False,
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score predicted label volumes against ground truth (``recursive``: the files in the
    sub-folders of the two folders too).

    Pairing: two files are compared directly. With folders, a prediction is
    compared with the ground-truth file of the same case name, or
    ``<case>_k<K>`` with ``<case>_L<level>`` where the level is ``level`` or the
    level of ``dataset.json`` (beside or above the ground truth) with K classes,
    or else (a BIDS name) with the one ``dseg`` file of the same entities other than
    ``desc`` (:func:`~hypsegcli.io.bids_match`), or else with ``<case>``. A dataset
    folder holding ``labels/`` may be given as ``truth``.

    Batch behaviour: with parts (:func:`hypsegcli.batch.resolve_part`) only
    this part's share of the pairs, sorted by prediction path, is scored. A
    pair that cannot be scored is reported in ``failures`` (and logged) and
    the others are scored. With ``csv_path`` the CSV is written and a run
    record is appended to the manifest in its folder; ``{part}`` in its name
    becomes the part id, and is required when the run is one part of several
    (:func:`part_csv_path`).
    """
    from . import metrics

    progress = progress or _noop
    dataset = _find_dataset_json(Path(truth), level=level)
    pairs = pair_files(pred, truth, level=level, dataset=dataset, recursive=recursive)
    itself = [p["pred"] for p in pairs if entry_path(p["pred"]) == entry_path(p["truth"])]
    if itself:
        log.warning(
            "%s%s: scored against itself as its own ground truth (Dice 1 by construction); "
            "give the predictions and the ground truth folders of their own",
            itself[0],
            f" and {len(itself) - 1} other file(s)" if len(itself) > 1 else "",
        )
    part = resolve_part(num_parts, part_id, environ)
    if csv_path is not None and os.fspath(csv_path) == "-":  # (QA: a file named "-" was made)
        raise BadInputError(
            "--csv -: evaluate writes its table to a file; the scores reach stdout with --json"
        )
    if csv_path is not None:
        csv_path = part_csv_path(Path(csv_path), part)
        check_output_file(
            csv_path,
            [f for pair in pairs for f in (pair["pred"], pair["truth"])],
            what="evaluate --csv",
        )
        _check_no_folder_at(csv_path.parent, [MANIFEST_NAME], what="evaluate --csv")
    selected = _select_part(pairs, part, key=lambda pair: str(pair["pred"]), what="pair")
    names = {(int(c["level"]), int(c["id"])): c["name"] for c in (dataset or {}).get("classes", [])}
    config = {
        "pred": str(pred),
        "truth": str(truth),
        "level": level,
        "hausdorff": hausdorff,
        "csv": str(csv_path) if csv_path is not None else None,
        "num_parts": num_parts,
        "part_id": part_id,
        "recursive": recursive,
    }
    folder = Path(csv_path).parent if csv_path is not None else None
    failures = Failures(len(selected))
    cases = []
    singular_warned: set[str] = set()
    with RunRecorder(folder, "evaluate", config, part, argv, environ, failures=failures) as run:
        run.set(device=None, seed=None)
        for i, pair in enumerate(selected):
            watch = Stopwatch()
            hashes: dict[str, str] = {}
            try:
                p_vol = read_volume(pair["pred"], native=True, quiet=True)
                t_vol = read_volume(pair["truth"], native=True)
                hashes = {
                    "pred_sha256": array_sha256(p_vol.data),
                    "truth_sha256": array_sha256(t_vol.data),
                }
                watch.lap("read")
                if p_vol.data.shape != t_vol.data.shape:
                    raise BadInputError(
                        f"{pair['pred']} has shape {p_vol.data.shape} but {pair['truth']} has shape {t_vol.data.shape}"
                    )
                _warn_if_other_grid(pair["pred"], p_vol.geometry, pair["truth"], t_vol.geometry)
                linear = np.asarray(t_vol.geometry.affine, dtype=np.float64)[:3, :3]
                if (
                    hausdorff
                    and np.isfinite(linear).all()  # (not finite: said as it was read)
                    and not metrics.linear_is_usable(linear)
                    and str(pair["truth"]) not in singular_warned
                ):
                    singular_warned.add(str(pair["truth"]))  # once per file, not per pair
                    log.warning(
                        "%s: its affine is singular or not finite; distances use the voxel "
                        "sizes %s instead",
                        pair["truth"],
                        "x".join(f"{s:g}" for s in t_vol.geometry.spacing),
                    )
                try:
                    score = metrics.score_case(
                        _as_labels(p_vol.data, pair["pred"]),
                        _as_labels(t_vol.data, pair["truth"]),
                        t_vol.geometry.spacing,
                        surface_distances=hausdorff,
                        linear=linear,
                    )
                except BadInputError as exc:
                    raise BadInputError(f"{pair['pred']} vs {pair['truth']}: {exc}") from None
                watch.lap("score")
            except Exception as exc:  # noqa: BLE001 - one bad pair does not stop the batch
                failure = failures.record(pair["pred"], exc)
                run.add(
                    pair["pred"],
                    status="failed",
                    truth=str(pair["truth"]),
                    seconds=watch.seconds,
                    error=failure.message,
                    **hashes,
                )
                if failures.total > 1:  # a single failure is just the error line
                    progress("evaluate", i + 1, len(selected))
                continue
            result = score.to_dict()
            for cls in result["classes"]:
                cls["name"] = (
                    names.get((pair["level"], cls["class_id"]))
                    if pair["level"] is not None
                    else None
                )
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
            run.add(
                pair["pred"],
                status="done",
                truth=str(pair["truth"]),
                seconds=watch.seconds,
                mean_dice=result["mean_dice"],
                **hashes,
            )
            progress("evaluate", i + 1, len(selected))
        report = {
            "cases": cases,
            "summary": _dice_summary(cases),
            "pairs": len(selected),
            "part": part.to_dict(),
            "failures": failures.to_json(),
            "manifest": str(run.path) if run.path else None,
        }
        if csv_path is not None and not cases and failures:
            # (an earlier run's table there is kept rather than replaced by an empty one)
            log.warning("%s: not written: no pair was scored", csv_path)
        elif csv_path is not None:
            write_evaluation_csv(report, Path(csv_path))
        run.exit_status = failures.exit_code
    return report


def _dice_summary(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, Any], list[float]] = {}
    for case in cases:
        groups.setdefault((case["level"], case["k"]), []).append(case["mean_dice"])
    return [
        {
            "level": lvl,
            "k": k,
            "n": len(values),
            "mean_dice": float(np.mean(values)),
            "std_dice": float(statistics.pstdev(values)) if len(values) > 1 else 0.0,
        }
        for (lvl, k), values in sorted(
            groups.items(),
            key=lambda kv: (  # (no level or k first; level 0 is a level)
                -1 if kv[0][0] is None else kv[0][0],
                -1 if kv[0][1] is None else kv[0][1],
            ),
        )
    ]


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Labels as int64 from a volume read with ``native=True`` (integers as stored, floats
    checked to be integral in their own precision); negative values are refused."""
    if np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_:
        if data.dtype == np.uint64 and data.max(initial=0) > np.iinfo(np.int64).max:
            raise BadInputError(f"{path}: not a label volume (values beyond 2^63 - 1)")
        labels = data.astype(np.int64)
    else:
        labels = np.rint(data)
        if not np.array_equal(labels, data):
            raise BadInputError(f"{path}: not a label volume (non-integer values)")
        if float(np.abs(labels).max(initial=0)) > 2**53:  # (2^53 overflows a float16)
            raise BadInputError(f"{path}: not a label volume (values beyond 2^53)")
        labels = labels.astype(np.int64)
    if labels.min(initial=0) < 0:
        raise BadInputError(f"{path}: not a label volume (negative values)")
    return labels


#: Placeholder of ``evaluate --csv`` replaced by the part id.
PART_PLACEHOLDER = "{part}"


def part_csv_path(path: Path, part: Part) -> Path:
    """``path`` with ``{part}`` replaced by the part id; a run that is one part of several
    needs it, since every part would otherwise replace the same file with its own rows."""
    text = str(path)
    if PART_PLACEHOLDER in text:
        return Path(text.replace(PART_PLACEHOLDER, str(part.index)))
    if part.split:
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        raise BadInputError(
            f"--csv {path} with {part.describe()}: every part would replace the same file with "
            f"its own rows; put {PART_PLACEHOLDER} in the name (e.g. --csv "
            f"{path.with_name(stem + '_' + PART_PLACEHOLDER + path.suffix)})"
        )
    return path


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
                    "" if case["k"] is None else case["k"],
                    "" if case["level"] is None else case["level"],
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
    paths: list[Path],
    *,
    method: str = "percentile",
    low: float = 1.0,
    high: float = 99.0,
    masks: _Masks | None = None,
) -> list[Any]:
    """Read and normalise the training volume files ``paths`` (:func:`collect_inputs`'s
    list; ``sampling.normalize``), with their masks (``train --mask``); errors name the
    file."""
    from .sampling import normalize
    from .training import TrainingVolume

    volumes = []
    for path in paths:
        vol = read_volume(path)
        inside, record = masks.read(path, vol) if masks is not None else (None, {})
        volumes.append(
            TrainingVolume(
                name=str(path),
                data=normalize(vol.data, method, low=low, high=high, name=str(path)),
                sha256=array_sha256(vol.data),
                mask=inside,
                mask_sha256=record.get("inside_sha256"),
                mask_name=str(masks.paths[path]) if masks is not None else None,
                spacing=tuple(float(x) for x in vol.geometry.spacing),
                unit=vol.geometry.unit,
            )
        )
    _warn_mixed_spacing(volumes)
    return volumes


#: Voxel sizes within this factor of each other count as one scale (patches are in voxels).
SCALE_TOLERANCE = 1.5


def with_unit(number: str, unit: str) -> str:
    """ "2.5 mm", or "2.5 (units unknown)" where the header gives none."""
    return f"{number} (units unknown)" if unit in ("", "unknown") else f"{number} {unit}"


def _spacing_text(spacings: Any, unit: str) -> str:
    """ "1x1x1 to 1x1x3 mm": the range of voxel sizes ``spacings`` (n, 3)."""
    arr = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    lo, hi = arr.min(0), arr.max(0)
    text = "x".join(f"{v:.3g}" for v in lo)
    if not np.array_equal(lo, hi):
        text += " to " + "x".join(f"{v:.3g}" for v in hi)
    return with_unit(text, unit)


def _units_text(units: set[str]) -> str:
    """ "mm", or "mm/unknown" where some volumes have no unit (known units first)."""
    return "/".join([*sorted(units - {"unknown"}), *(["unknown"] if "unknown" in units else [])])


def _warn_mixed_spacing(volumes: list[Any]) -> None:
    """Warn when training volumes differ in voxel size: patches are in voxels, so one patch
    covers a different physical size in each."""
    units = sorted({v.unit for v in volumes if v.unit not in (None, "unknown")})
    spacings = np.array([v.spacing for v in volumes if v.spacing is not None], dtype=np.float64)
    named = _units_text({v.unit or "unknown" for v in volumes if v.spacing is not None})
    if len(units) > 1:
        log.warning(
            "the training volumes have voxel sizes in different units (%s): patches are in "
            "voxels, so a patch covers another physical size in each",
            ", ".join(units),
        )
    elif len(spacings) > 1 and (spacings.max(0) > SCALE_TOLERANCE * spacings.min(0)).any():
        log.warning(
            "the training volumes' voxel sizes range over %s: patches are in voxels, so a "
            "patch covers another physical size in each (resample them to one voxel size "
            "to learn one scale)",
            _spacing_text(spacings, named if units else ""),
        )


def _warn_other_scale(model: LoadedModel, volume: Any) -> None:
    """Warn when ``volume``'s voxel size is far from (or in another unit than) those the
    model was trained on: its structures then span other numbers of voxels than the
    patches learned (models written before the voxel sizes were recorded: no check)."""
    # (an MRC of unknown voxel size, in "voxel" units, is no evidence: its 1x1x1 stands in
    # for a size nobody recorded)
    trained = [
        v
        for v in model.document.get("training_volumes", [])
        if isinstance(v, dict)
        and isinstance(v.get("spacing"), list)
        and len(v["spacing"]) == 3
        and v.get("unit") != "voxel"
    ]
    if not trained or volume.geometry.unit == "voxel" or volume.path in model.scale_warned:
        return
    model.scale_warned.add(volume.path)  # (once a volume: a pooled fit embeds it twice)
    units = {str(v.get("unit")) for v in trained}
    arr = np.array([v["spacing"] for v in trained], dtype=np.float64)
    sp = np.asarray(volume.geometry.spacing, dtype=np.float64)
    unit = volume.geometry.unit
    known = units - {"unknown"}  # (a NIfTI without units is no evidence either way)
    if (
        (unit == "unknown" or not known or unit in known)
        and (sp >= arr.min(0) / SCALE_TOLERANCE).all()
        and (sp <= arr.max(0) * SCALE_TOLERANCE).all()
    ):
        return
    log.warning(
        "%s: voxel size %s, but %s was trained on %s: patches are in voxels, so structures "
        "span other numbers of voxels than in training (resample to the training voxel size)",
        volume.path,
        _spacing_text(sp, unit),
        model.path,
        _spacing_text(arr, _units_text(units)),
    )


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
    overwrite: bool = False,
    recursive: bool = False,
    mask: Path | None = None,
    lr_given: bool = True,
    batch_size_given: bool = True,
    grad_clip_given: bool = True,
    asked: frozenset[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train on the volumes in ``inputs``; write ``output`` and its checkpoint and history.

    An earlier run's model or checkpoint at ``output`` is continued (``resume``) or
    replaced (``overwrite``); with neither, the run is refused before any work.
    ``mask`` (``--mask``, as for :func:`cluster`): anchors centre inside the masks.
    ``lr_given`` False (no ``--lr``): a resumed run keeps the checkpoint's learning rate;
    ``batch_size_given`` False (no ``--batch-size``): its batch size likewise;
    ``grad_clip_given`` False (no ``--grad-clip``): its gradient clipping likewise.
    ``asked``: the settings (configuration keys) the command line gave, of which a resumed
    run names those the checkpoint's differ from (None: every setting)."""
    from . import distributed, training
    from .config import SamplingConfig, recorded_grad_clip

    distributed.quiet_other_ranks()  # under torchrun, ranks > 0 log warnings only
    set_threads(threads)
    # (a bad --device before -o's folder is made; and before the inputs are read, so that
    # under torchrun a rank that cannot read them still joins the job and says so)
    resolved = training.resolve_device(device)

    def prepare() -> tuple[list[Any], dict[str, Any] | None, Any, bool]:
        paths = collect_inputs(inputs, recursive=recursive)
        masks = _Masks(mask, paths, paths, recursive=recursive) if mask is not None else None
        for target in (Path(output), *training.companion_paths(Path(output))):
            check_output_file(target, [*paths, *(masks.files() if masks else [])], what="train -o")
        check_name_length(lock_path(output), "give train -o a shorter name")
        if job.is_main:  # held to the end: the same run started twice is refused here
            held.enter_context(exclusive_writer(Path(output), "hypseg train"))
        if resume and overwrite:
            raise BadInputError(
                "--resume continues the earlier run and --overwrite replaces it: give one"
            )
        if not resume and not overwrite:
            for earlier in (Path(output), training.companion_paths(Path(output))[0]):
                if earlier.exists():  # an interrupted run's checkpoint is hours of work
                    what = "model, or another file" if earlier == Path(output) else "checkpoint"
                    raise BadInputError(
                        f"{earlier}: exists (an earlier run's {what}); continue that run with "
                        "--resume, or start over, replacing it, with --overwrite"
                    )
        norm_config, checkpoint, config = sampling_config, None, train_config
        if resume:  # the checkpoint's normalisation, whatever this command line says
            checkpoint = training.load_checkpoint(Path(output))
            norm_config = SamplingConfig.from_dict(checkpoint["sampling_config"])
            kept = checkpoint.get("train_config", {})
            kept = kept if isinstance(kept, dict) else {}
            kept_lr, kept_batch = kept.get("lr"), kept.get("batch_size")
            if not lr_given and isinstance(kept_lr, (int, float)):
                config = dataclasses.replace(config, lr=float(kept_lr))
            if not batch_size_given and is_whole(kept_batch, 1) and kept_batch <= 1 << 16:
                config = dataclasses.replace(config, batch_size=kept_batch)
            kept_clip = recorded_grad_clip(kept)
            if not grad_clip_given and (
                kept_clip is None
                or (isinstance(kept_clip, (int, float)) and 0 <= kept_clip < math.inf)
            ):
                config = dataclasses.replace(config, grad_clip=kept_clip)
        volumes = load_training_volumes(
            paths,
            method=norm_config.norm,
            low=norm_config.norm_low,
            high=norm_config.norm_high,
            masks=masks,
        )
        return volumes, checkpoint, config, masks is not None

    # under torchrun every rank joins before it reads anything, so that one failing on its
    # inputs stops the others at once instead of leaving them waiting for it to join
    held = contextlib.ExitStack()  # (the lock on writing -o)
    with held, distributed.session(resolved) as job:
        try:
            volumes, checkpoint, train_config, masked = prepare()
        except Exception as exc:
            job.start_together(exc, None)
            raise
        job.start_together(None, _training_identity(volumes, checkpoint))
        if job.is_main:  # a killed save's model or checkpoint (see io.STALE_TEMPORARY_S)
            remove_stale_temporaries(Path(output).parent)
            if asked is None or "r_max" in asked:
                _warn_if_r_max_unreachable(volumes, sampling_config)

        def remove_earlier_run() -> None:
            # the earlier run goes before the first step (once the inputs, the sampler and
            # the model are checked: a refused run keeps it), not file by file as this one
            # writes its own: a run that fails or is stopped must not leave the old model
            # beside its checkpoint
            for earlier in (Path(output), *training.companion_paths(Path(output))):
                _remove_if_present(earlier)

        log.info(
            "training on %d volume(s)%s, device %s",
            len(volumes),
            " (anchors inside their masks)" if masked else "",
            resolved,
        )
        result = training.train(
            volumes,
            Path(output),
            model_config=model_config,
            sampling_config=sampling_config,
            train_config=train_config,
            device=device,
            resume=resume,
            checkpoint=checkpoint,
            progress=progress,
            job=job,
            starting=remove_earlier_run if overwrite and job.is_main else None,
            asked=asked,
        )
    return {"volumes": len(volumes), **result.to_dict()}


def _warn_if_r_max_unreachable(volumes: Sequence[Any], sampling_config: Any) -> None:
    """A warning where ``--r-max`` is larger than any of ``volumes`` allows (QA: `--r-max
    100` on 24^3 volumes trained without a word): an anchor fits a volume's shortest side
    and leaves room for a negative of side ``l_min`` along its longest, so the sampler
    draws each volume's anchors up to that limit, not up to --r-max."""
    limits = [min(min(v.data.shape), max(v.data.shape) - sampling_config.l_min) for v in volumes]
    if limits and sampling_config.r_max > max(limits):
        log.warning(
            "--r-max %g: no volume allows anchors beyond %g voxels (an anchor fits a volume's "
            "shortest side, with room for a negative beside it along its longest); anchors "
            "are drawn up to each volume's own limit",
            sampling_config.r_max,
            max(limits),
        )


def _check_no_folder_at(folder: Path, names: Sequence[str], *, what: str) -> None:
    """The files a run writes into ``folder`` at its end (the run manifest, the merged
    centroids) are not folders: refused before any work rather than after all of it."""
    for name in names:
        if (folder / name).is_dir():
            raise BadInputError(
                f"{folder / name}: is a folder, where {what} writes a file of that name"
            )


def _training_identity(volumes: list[Any], checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """What every torchrun rank must have read alike: the volumes (names, voxels, masks'
    insides) and the checkpoint's step."""
    return {
        "volumes": [(Path(v.name).name, v.sha256, v.mask_sha256) for v in volumes],
        "step": int(checkpoint["step"]) if checkpoint is not None else None,
    }


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
    """A model file, its hashes and the VAE built from it (on a device).

    ``sha256`` is the file's; ``content_sha256`` covers only what the embeddings
    depend on (configuration, normalisation, weights) and keys the cache, so a
    model retrained to identical weights reuses cached embeddings and fits.
    """

    def __init__(self, path: Path, device: str = "auto") -> None:
        from .io import file_sha256
        from .modelfile import build_model, load_model_file, model_content_sha256
        from .training import resolve_device

        self.path = Path(path)
        self.document = load_model_file(self.path)
        self.sha256 = file_sha256(self.path)
        self.content_sha256 = model_content_sha256(self.document)
        self.device = resolve_device(device)
        self.model = build_model(self.document, path=self.path).to(self.device)
        self.normalization = dict(self.document["normalization"])
        #: volumes already warned about for a voxel size far from the training ones
        self.scale_warned: set[Path] = set()

    def normalize(self, data: np.ndarray, name: str) -> np.ndarray:
        from .config import NORMALIZATIONS
        from .sampling import normalize

        norm = self.normalization
        method = norm.get("method")
        if method not in NORMALIZATIONS:
            raise BadInputError(f"{self.path}: unknown normalisation {method!r}")
        return normalize(data, method, low=float(norm["low"]), high=float(norm["high"]), name=name)


def _embedding_params(model: LoadedModel, patch_size: int, stride: int) -> dict[str, Any]:
    from .sampling import NORM_CLIP

    return {
        "method": "dense-v1",
        "patch_size": int(patch_size),
        "stride": int(stride),
        "normalization": model.normalization,
        "norm_clip": NORM_CLIP
        if model.normalization.get("method") in ("percentile", "zscore")
        else None,
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
    volume_sha256: str | None = None,
    reuse: bool = True,
) -> tuple[np.ndarray, bool]:
    """Embeddings of one volume, from the cache or computed (then cached). Returns (array, cached).

    ``reuse=False`` recomputes even when the cache holds the entry (and replaces it).
    """
    from .embedding import embed_volume

    _warn_other_scale(model, volume)
    key = _cache_key(volume_sha256 or array_sha256(volume.data), model, patch_size, stride)
    hit = cache.get(key) if reuse else None
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
        {  # (absolute: `cache ls` runs from any folder, and the cache is shared)
            "volume": os.path.abspath(volume.path),
            "model": os.path.abspath(model.path),
            "patch_size": patch_size,
            "stride": stride,
        },
    )
    return emb, False


def _cache_key(volume_sha256: str, model: LoadedModel, patch_size: int, stride: int) -> str:
    from .cache import embedding_key

    return embedding_key(
        volume_sha256,
        model.content_sha256,
        _embedding_params(model, patch_size, stride),
        __version__,
    )


#: Part of every cached k-means fit's key: bump it whenever the per-volume fit
#: (``_Clusterer.fit``, :class:`hypsegcli.kmeans.PoincareKMeans`, scikit-learn's
#: use) would give other centroids for the same embeddings, so old fits are redone.
KMEANS_CACHE_VERSION = 2


def _centroids_key(
    volume_sha256: str,
    model: LoadedModel,
    patch_size: int,
    stride: int,
    k: int,
    clusterer: Any,
    nest: dict[str, Any] | None = None,
    mask_sha256: str | None = None,
) -> str:
    """Cache key of the per-volume k-means fit on this volume's embeddings (and nothing else).

    It covers what the embeddings depend on (as :func:`_cache_key`) and what
    the fit depends on: geometry, curvature, k, seed, restarts, fit sample.
    The spatial steps (--smooth, --snap, --mrf) come after the fit and are not
    in it, so changing them reuses the fit, except for a fit nested in the
    coarsest level (``nest``, from :func:`_nest_spec`): it leaves out the band
    around that level's labels, which the spatial steps shape. With ``cluster
    --mask`` the fit sees the voxels inside only: ``mask_sha256`` (of the inside).
    """
    from .cache import embedding_key

    params = {
        "centroids": {
            "embedding": _embedding_params(model, patch_size, stride),
            "kind": clusterer.kind,
            "curvature": clusterer.curvature,
            "k": int(k),
            "seed": int(clusterer.seed),
            "n_init": int(clusterer.n_init),
            "fit_samples": int(clusterer.fit_samples),
            "version": KMEANS_CACHE_VERSION,
        }
    }
    if clusterer.select != "inertia":  # absent for the default: fits cached before stay valid
        params["centroids"]["select"] = clusterer.select
    if nest is not None:
        params["centroids"]["nest"] = nest
    if mask_sha256 is not None:
        params["centroids"]["mask"] = mask_sha256
    return embedding_key(volume_sha256, model.content_sha256, params, __version__)


def _nested_in(k: int, ks: list[int], nest: float) -> int | None:
    """The k whose labels ``k``'s are nested in (``cluster --nest``), or None."""
    return min(ks) if nest > 0 and len(ks) > 1 and k != min(ks) else None


def _nest_spec(
    k: int, ks: list[int], nest: float, smooth: float, snap: float, mrf: float
) -> dict[str, Any] | None:
    """What a per-volume fit of ``k`` nested in the smallest k (``cluster --nest``) depends on.

    None when ``k`` is not nested (nesting off, a single k, or ``k`` is the
    smallest): then the fit is the plain one. Otherwise the band width and
    everything that shapes the coarse labels beyond the plain fit of the
    smallest k: its k and the spatial steps.
    """
    coarse_k = _nested_in(k, ks, nest)
    if coarse_k is None:
        return None
    return {
        "width": float(nest),
        "coarse_k": int(coarse_k),
        "smooth": float(smooth),
        "snap": float(snap),
        "mrf": float(mrf),
    }


def _existing_cache(root: Path, *, optional: bool = False) -> Any:
    """The cache at ``root`` if its folder exists (a dry run creates nothing), else None.
    ``optional``: the run can do without storing entries (``cluster``)."""
    from .cache import LAYOUT, EmbeddingCache

    folder = Path(root) / LAYOUT
    if not folder.is_dir():
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        log.warning(
            "%s: the cache folder is not writable; %s",
            folder,
            "its entries are read, new ones will not be stored"
            if optional
            else "the run will fail there",
        )
    try:
        return EmbeddingCache(root, create=False)  # no write probe: a dry run writes nothing
    except Exception:  # noqa: BLE001 - an unusable cache holds nothing usable
        return None


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
    skip_existing: bool | None = None,
    num_parts: int | None = None,
    part_id: int | None = None,
    dry_run: bool = False,
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fill the embedding cache for ``inputs``; with ``output`` also write ``<case>.npy`` arrays.

    Each array is float32 of shape (X, Y, Z, d), indexed like the volume
    (``[x, y, z]``), holding the encoder's posterior mean for the patch centred
    on each voxel (points of the Poincaré ball for hyperbolic models).

    ``skip_existing``: None (default) reuses cached embeddings and (re)writes
    the ``.npy`` files; True skips a volume whose output exists (with ``output``
    the ``.npy`` file and its record, made by this model with these options from
    the input as it is now: :func:`_embedding_done`; else its cache entry);
    False recomputes every embedding, replacing cache entries and files.
    With parts only this part's share of the sorted inputs is processed. A
    volume that fails is reported in ``failures`` and the others go on. With
    ``output`` a run record is appended to ``output/hypseg-runs.jsonl``.
    ``dry_run`` returns the plan (:func:`plan`) and computes nothing.
    """
    from .cache import EmbeddingCache, resolve_cache_dir
    from .embedding import DEFAULT_TILE

    progress = progress or _noop
    _check_embedding_options(patch_size, stride)
    set_threads(threads)
    paths = collect_inputs(inputs, recursive=recursive)
    if output is not None:
        check_unique_cases(paths, why=f"their embeddings in {output} would overwrite each other")
        check_output_folder(output, inputs, recursive=recursive, what="embed -o", create=False)
        _check_no_folder_at(Path(output), [MANIFEST_NAME], what="embed -o")
        for path in paths:
            for name in (f"{case_name(path)}.npy", f"{case_name(path)}.json"):
                check_name_length(
                    Path(output) / name, f"the output named after {path} (rename it shorter)"
                )
    part = resolve_part(num_parts, part_id, environ)
    selected = _select_part(paths, part)
    model = LoadedModel(model_path, device)
    if output is not None and not dry_run:  # made once the model has loaded
        check_output_folder(output, what="embed -o")
        remove_stale_temporaries(output, recursive=recursive)
    out = Path(output) if output is not None else None
    cache_root = resolve_cache_dir(cache_dir)
    config = {
        "inputs": [str(i) for i in inputs],
        "model": str(model_path),
        "output": str(out) if out is not None else None,
        "patch_size": patch_size,
        "stride": stride,
        "tile": tile if tile is not None else DEFAULT_TILE,
        "device": device,
        "threads": threads,
        "torch_threads": _torch_threads(),
        "cache_dir": str(cache_root),
        "recursive": recursive,
        "skip_existing": skip_existing,
        "num_parts": num_parts,
        "part_id": part_id,
    }

    def npy_of(path: Path) -> Path | None:
        return out / f"{case_name(path)}.npy" if out is not None else None

    if dry_run:
        cache = _existing_cache(cache_root)
        done = {
            path: bool(
                skip_existing
                and out is not None
                and _embedding_done(npy_of(path), path, model, patch_size, stride) is not None  # type: ignore[arg-type]
            )
            for path in selected
        }
        return plan(
            "embed",
            selected,
            part,
            model=model,
            done=done,
            cache=cache,
            reuse_cache=skip_existing is not False,
            patch_size=patch_size,
            stride=stride,
            tile=tile,
            total_inputs=len(paths),
            config=config,
        )
    cache = EmbeddingCache(cache_root)
    failures = Failures(len(selected))
    rows: list[dict[str, Any]] = []
    with RunRecorder(out, "embed", config, part, argv, environ, failures=failures) as run:
        run.set(
            device=str(model.device), seed=None, model=str(model_path), model_sha256=model.sha256
        )
        for i, path in enumerate(selected):
            watch = Stopwatch()
            sha: str | None = None
            target = npy_of(path)
            row: dict[str, Any] = {"volume": str(path)}
            try:
                if target is not None:
                    _refuse_foreign_record(_sidecar_of(target), EMBEDDING_RECORD_FORMAT, target)
                kept = (
                    _embedding_done(target, path, model, patch_size, stride)
                    if skip_existing and target is not None
                    else None
                )
                if kept is not None:
                    assert target is not None
                    row.update(status="skipped", shape=None, cached=False, output=str(target))
                    sha = kept.get("volume_sha256")  # as recorded when the array was written
                else:
                    stamp = _source_stamp(path)
                    volume = read_volume(path)
                    sha = array_sha256(volume.data)
                    watch.lap("read")
                    if (
                        skip_existing
                        and target is None
                        # read as cluster will (verified: a corrupt entry is removed, a miss)
                        and cache.get(_cache_key(sha, model, patch_size, stride)) is not None
                    ):
                        row.update(status="skipped", shape=None, cached=True)
                    else:
                        emb, cached = embed_one(
                            volume,
                            model,
                            cache,
                            patch_size=patch_size,
                            stride=stride,
                            tile=tile,
                            progress=progress,
                            volume_sha256=sha,
                            reuse=skip_existing is not False,
                        )
                        watch.lap("embed")
                        row.update(
                            status="cached" if cached else "computed",
                            shape=list(emb.shape),
                            cached=cached,
                        )
                        if target is not None:
                            # the record last, and the old one gone before the array is
                            # replaced: a record says its array is complete and matches it
                            sidecar = _sidecar_of(target)
                            _remove_if_present(sidecar)
                            _save_npy(target, np.asarray(emb, dtype=np.float32))
                            record = _embedding_record(
                                volume, model, sha, emb.shape, patch_size, stride
                            )
                            record["source"] = _source_record(stamp, sha, volume)
                            write_text_atomic(sidecar, json.dumps(record, indent=2) + "\n")
                            watch.lap("write")
                            row["output"] = str(target)
            except Exception as exc:  # noqa: BLE001 - one bad volume does not stop the batch
                failure = failures.record(path, exc)
                row.update(status="failed", shape=None, cached=False, error=failure.message)
            row["seconds"] = watch.total
            row["stages"] = dict(watch.seconds)
            rows.append(row)
            run.add(
                path,
                status=row["status"],
                sha256=sha,
                seconds=watch.seconds,
                output=row.get("output"),
                error=row.get("error"),
            )
            if row["status"] != "failed" or failures.total > 1:
                progress("volumes", i + 1, len(selected))
        run.exit_status = failures.exit_code
    return {
        "model": str(model_path),
        "cache": str(cache.root),
        "computed": sum(r["status"] == "computed" for r in rows),
        "cached": sum(r["status"] == "cached" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": len(failures),
        "part": part.to_dict(),
        "volumes": rows,
        "failures": failures.to_json(),
        "manifest": str(run.path) if run.path else None,
    }


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def plan(
    command: str,
    selected: list[Path],
    part: Part,
    *,
    model: LoadedModel | None,
    done: dict[Path, bool],
    cache: Any,
    reuse_cache: bool,
    patch_size: int,
    stride: int,
    tile: int | None,
    total_inputs: int,
    config: dict[str, Any],
    ks: list[int] | None = None,
    n_init: int = 2,
    select: str = "inertia",
    fit_samples: int = 200_000,
    pooled_fit: bool = False,
    smooth: float = 0.0,
    snap: float = 0.0,
    mrf: float = 0.0,
    nest: float = 0.0,
    min_size: int = 0,
    clusterer: Any = None,
    masks: _Masks | None = None,
    euclidean: bool = False,
) -> dict[str, Any]:
    """What ``embed``/``cluster`` would do (``--dry-run``): per volume its shape, state and estimates.

    States: ``done`` (outputs exist; skipped), ``cached`` (embeddings in the
    cache), ``compute`` (to be embedded), ``cluster`` (intensity features; no
    embedding) or ``error`` (unreadable). Volumes not done are read and hashed
    to look them up in the cache; nothing is written, no model is run. For
    ``cluster`` with a model, ``cached_fits`` lists the k whose per-volume
    k-means fit is in the cache; for ``cluster``, ``fits`` lists the k this
    volume's own k-means fit would be computed for. ``clusterer`` is the
    per-volume k-means, None when the volumes are not fitted one by one (a
    pooled fit, ``pooled_fit``, or given centroids): then ``fits`` is empty.
    Only the assignment is estimated for the k not in ``fits``. With ``masks``
    (``cluster --mask``) each volume's mask is read too, to look up its fits.
    ``euclidean``: the fits are scikit-learn's (``--metric euclidean``,
    intensity features), whose import is counted once. ``select``: how a fit keeps
    one of its ``n_init`` restarts (``cluster --select``; the silhouette costs time).
    Estimates are described in :data:`hypsegcli.batch.PLAN_NOTES`.
    """
    import torch

    from .batch import (
        EMBED_PLAN_NOTES,
        ENCODER_EFFICIENCY,
        GPU_ENCODER_EFFICIENCY,
        PLAN_NOTES,
        SKLEARN_IMPORT_BYTES,
        SKLEARN_IMPORT_S,
        current_rss_bytes,
        estimate_embedding,
        estimate_kmeans_seconds,
        estimate_min_size,
        estimate_mrf,
        estimate_nest,
        estimate_smooth,
        estimate_snap,
        measure_flop_rate,
        peek_shape,
    )
    from .embedding import DEFAULT_TILE, flops_per_voxel
    from .sampling import _checked_volume

    tile = tile if tile is not None else DEFAULT_TILE
    dev = model.device if model is not None else torch.device("cpu")
    rate = measure_flop_rate(dev)
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    baseline = current_rss_bytes()
    # scikit-learn's k-means is imported by the first fit that runs (once per process): the
    # pooled fit, before any volume, or the first volume with a fit of its own
    sklearn_pending = bool(ks and euclidean and "sklearn" not in sys.modules)
    sklearn_import = sklearn_pending and pooled_fit
    own_fits = bool(ks and clusterer is not None)  # each volume fitted on its own
    d = int(model.model.cfg.latent_dim) if model is not None else 1
    rows = []
    for path in selected:
        row: dict[str, Any] = {"volume": str(path)}
        try:
            shape = peek_shape(path)
            voxels = int(np.prod(shape))
            row.update(shape=list(shape), voxels=voxels)
            if done[path]:
                row.update(state="done", seconds=0.0, peak_bytes=None)
                rows.append(row)
                continue
            state = "cluster"
            cached_fits: list[int] = []
            fit_points = voxels  # what a fit of this volume draws from: the mask's inside
            mask_record = None
            if model is not None or (masks is not None and own_fits):
                volume = read_volume(path)
                # what the run would refuse in it (QA: a constant volume planned "compute")
                _checked_volume(volume.data, str(path))
                if masks is not None and own_fits:
                    mask_record = masks.read(path, volume)[1]
                    fit_points = int(mask_record["inside"])
            if model is not None:
                sha = array_sha256(volume.data)
                key = _cache_key(sha, model, patch_size, stride)
                cached = reuse_cache and cache is not None and key in cache
                state = "cached" if cached else "compute"
                if own_fits and cache is not None:
                    mask_sha = mask_record["inside_sha256"] if mask_record else None
                    cached_fits = [
                        k
                        for k in ks
                        if _centroids_key(
                            sha,
                            model,
                            patch_size,
                            stride,
                            k,
                            clusterer,
                            _nest_spec(k, ks, nest, smooth, snap, mrf),
                            mask_sha,
                        )
                        in cache
                    ]
                if ks:
                    row["cached_fits"] = cached_fits
            seconds, peak = 0.0, baseline + 4.0 * voxels * 2
            if state == "compute":
                est = estimate_embedding(
                    model.model,
                    shape,
                    patch_size=patch_size,
                    stride=stride,
                    tile=tile,
                    workers=workers,
                    flop_rate=rate,
                    efficiency=ENCODER_EFFICIENCY if dev.type == "cpu" else GPU_ENCODER_EFFICIENCY,
                )
                seconds += est["seconds"]
                peak = baseline + est["array_bytes"] + est["activation_bytes"]
            if ks:
                fits = [] if clusterer is None else [k for k in ks if k not in cached_fits]
                row["fits"] = fits
                seconds += estimate_kmeans_seconds(
                    voxels,
                    fits,
                    n_init=n_init,
                    fit_samples=fit_samples,
                    flop_rate=rate,
                    euclidean=euclidean,
                    fit_points=fit_points,
                    select=select,
                )
                sklearn_import = sklearn_import or bool(sklearn_pending and fits)
                # pooled, given or cached centroids: the assignment only
                seconds += estimate_kmeans_seconds(
                    voxels,
                    [k for k in ks if k not in fits],
                    n_init=0,
                    fit_samples=fit_samples,
                    flop_rate=rate,
                )
                # features (d float32), a float32 copy for assignment, int64 labels
                peak = max(peak, baseline + 4.0 * voxels * (2 + 2 * d) + 8.0 * voxels)
                # each spatial step that is on: its time, and its working memory beside
                # the features (d float32) and a uint8 label map
                for on, estimate in (
                    (smooth > 0, partial(estimate_smooth, flop_rate=rate)),
                    (snap > 0, estimate_snap),
                    (mrf > 0, partial(estimate_mrf, flop_rate=rate)),
                    (nest > 0 and len(ks) > 1, estimate_nest),
                    (min_size > 1, estimate_min_size),
                ):
                    if on:
                        extra_s, step_bytes = estimate(shape, ks)
                        seconds += extra_s
                        peak = max(peak, baseline + 4.0 * voxels * d + voxels + step_bytes)
            if sklearn_import:  # imported by now, and resident from then on
                peak += SKLEARN_IMPORT_BYTES
            row.update(state=state, seconds=round(seconds, 3), peak_bytes=int(peak))
        except Exception as exc:  # noqa: BLE001 - shown in the plan
            from .batch import one_line

            row.update(state="error", error=one_line(exc), seconds=None, peak_bytes=None)
            row["bad_input"] = isinstance(exc, BadInputError)
        rows.append(row)
    extra = SKLEARN_IMPORT_S if sklearn_import else 0.0
    if pooled_fit and ks:
        extra += estimate_kmeans_seconds(
            fit_samples,
            ks,
            n_init=n_init,
            fit_samples=fit_samples,
            flop_rate=rate,
            euclidean=euclidean,
            select=select,
        )
    peaks = [r["peak_bytes"] for r in rows if r.get("peak_bytes")]
    counts = {
        state: sum(r.get("state") == state for r in rows)
        for state in ("done", "cached", "compute", "cluster", "error")
    }
    memory = _physical_memory()
    if peaks and memory and max(peaks) > memory:  # (e.g. an absurd --tile)
        log.warning(
            "the estimated peak memory, %.1f GB, is more than this machine has (%.1f GB): "
            "the run would fail or swap; try a smaller --tile or fewer --threads",
            max(peaks) / 1e9,
            memory / 1e9,
        )
    return {
        "dry_run": True,
        "command": command,
        "part": part.to_dict(),
        "inputs": total_inputs,
        "volumes": rows,
        "counts": counts,
        "device": str(dev),
        "threads": workers,
        "flop_rate": rate,
        "flops_per_voxel": flops_per_voxel(model.model, patch_size, stride=stride)
        if model is not None
        else None,
        "estimated_seconds": round(sum(r["seconds"] or 0.0 for r in rows) + extra, 3),
        "estimated_peak_bytes": int(max(peaks)) if peaks else None,
        "baseline_bytes": int(baseline),
        "config": config,
        "notes": PLAN_NOTES if command == "cluster" else EMBED_PLAN_NOTES,
    }


def _physical_memory() -> int | None:
    """This machine's memory in bytes, where the system says (else None)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def _check_embedding_options(patch_size: int, stride: int) -> None:
    for option, value in (("--patch-size", patch_size), ("--stride", stride)):
        if not float(value).is_integer():  # (the cache key and records hold integers)
            raise BadInputError(f"{option} {value}: should be a whole number of voxels")
    if patch_size < 1:
        raise BadInputError(f"--patch-size {patch_size}: should be >= 1")
    if stride < 1:
        raise BadInputError(f"--stride {stride}: should be >= 1")


#: ``format`` of the JSON written beside each ``embed -o`` array.
EMBEDDING_RECORD_FORMAT = "hypseg-embedding"


def _sidecar_of(npy: Path) -> Path:
    """``emb/<case>.npy`` -> ``emb/<case>.json``: the array's geometry and provenance."""
    return npy.with_name(npy.name[: -len(".npy")] + ".json")


def _embedding_record(
    volume: Any, model: Any, sha: str, shape: Sequence[int], patch_size: int, stride: int
) -> dict[str, Any]:
    """What ``embed -o`` writes beside ``<case>.npy``: the source volume's geometry (the array
    is indexed like it), where it came from and the space its vectors live in."""
    cfg = model.model.cfg
    return {
        "format": EMBEDDING_RECORD_FORMAT,
        "hypseg": __version__,
        "volume": str(volume.path),
        "volume_sha256": sha,
        "model": str(model.path),
        "model_sha256": model.sha256,
        "model_content_sha256": model.content_sha256,
        "shape": [int(s) for s in shape],
        "space": "poincare_ball" if cfg.hyperbolic else "euclidean",
        "curvature": float(cfg.curvature) if cfg.hyperbolic else None,
        "patch_size": patch_size,
        "stride": stride,
        "geometry": geometry_record(volume.geometry),
    }


def _embedding_done(
    target: Path, path: Path, model: Any, patch_size: int, stride: int
) -> dict[str, Any] | None:
    """``embed -o --skip-existing``: the record of ``target`` (``<case>.npy``) if the array
    and its record (written last) exist, the record was made by this model (its
    configuration, normalisation and weights) with these options from the input as it is
    now (:func:`_same_source`: its size and modification time, without reading it, or else
    its voxels and header), and the array has the recorded shape (read from its header
    only); else None."""
    try:
        record = _read_json(_sidecar_of(target)) if _sidecar_of(target).is_file() else None
    except OSError:
        return None
    if not isinstance(record, dict) or record.get("format") != EMBEDDING_RECORD_FORMAT:
        return None
    if (
        record.get("model_content_sha256") != model.content_sha256
        or record.get("patch_size") != patch_size
        or record.get("stride") != stride
    ):
        return None
    try:
        array = np.load(target, mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 - empty, cut, a zip, junk: not done, computed again
        return None
    if not isinstance(array, np.ndarray) or list(array.shape) != record.get("shape"):
        return None
    return record if _same_source(record.get("source"), path) else None


def _save_npy(path: Path, array: np.ndarray) -> None:
    from .io import atomic_output

    with atomic_output(path) as tmp:
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


#: Largest ``cluster --smooth`` and ``--mrf`` (Potts weights; float32 marginals overflow
#: beyond about 1e37 / 26 neighbours, and far smaller weights already freeze every label).
MAX_POTTS = 1e6
#: Largest ``cluster --snap`` (Gaussian sigma, voxels).
MAX_SNAP = 1000.0


def _by_silhouette_line(features: np.ndarray, fits: list[Any], rng: np.random.Generator) -> int:
    """Index of the Euclidean k-means fit (of ``fits``, on ``features``) whose labels have the
    largest mean silhouette on a seeded subset of the features (ties: lower inertia, then
    the earlier fit), as :class:`hypsegcli.kmeans.PoincareKMeans` with ``select="silhouette"``."""
    from scipy.spatial.distance import cdist

    from .kmeans import _SILHOUETTE_SAMPLES, _best_by_silhouette

    size = min(len(features), _SILHOUETTE_SAMPLES)
    sub = features[np.sort(rng.choice(len(features), size=size, replace=False))]
    labelings = [km.predict(sub) for km in fits]
    return _best_by_silhouette(cdist(sub, sub), labelings, [float(km.inertia_) for km in fits])


class _Clusterer:
    """Fits k centroids on features and assigns labels, the same way for every feature kind."""

    def __init__(
        self,
        kind: str,
        *,
        curvature: float,
        n_init: int,
        fit_samples: int,
        seed: int,
        device: Any,
        select: str = "inertia",
    ) -> None:
        self.kind = kind
        self.curvature = curvature
        self.n_init = n_init
        self.fit_samples = fit_samples
        self.seed = seed
        self.device = device
        self.select = select

    def fit(self, features: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Canonically ordered centroids (k, d) fitted on at most fit_samples points.

        ``rows`` (sorted row indices) limits the fit to those rows of
        ``features`` (``cluster --nest``); the sample is drawn from them.
        """
        rng = np.random.default_rng([self.seed, k])
        n = len(features) if rows is None else len(rows)
        if n > self.fit_samples:
            pick = np.sort(rng.choice(n, self.fit_samples, replace=False))
            features = features[pick if rows is None else rows[pick]]
        elif rows is not None:
            features = features[rows]
        features = np.asarray(features, dtype=np.float64)
        if self.kind == "ball":
            from .kmeans import PoincareKMeans

            km = PoincareKMeans(
                n_clusters=k,
                n_init=self.n_init,
                random_state=int(rng.integers(2**31)),
                c=self.curvature,
                fit_samples=self.fit_samples,
                select=self.select,
            ).fit(features)
            centers = np.asarray(km.cluster_centers_, dtype=np.float64)
            return centers[_canonical_order_ball(centers, self.curvature)]
        from sklearn.cluster import KMeans

        if self.select == "inertia" or self.n_init < 2:
            km = KMeans(
                n_clusters=k, n_init=self.n_init, random_state=int(rng.integers(2**31))
            ).fit(features)
        else:  # each restart on its own, kept by the silhouette as PoincareKMeans does
            fits = [
                KMeans(n_clusters=k, n_init=1, random_state=int(rng.integers(2**31))).fit(features)
                for _ in range(self.n_init)
            ]
            km = fits[_by_silhouette_line(features, fits, rng)]
        centers = np.asarray(km.cluster_centers_, dtype=np.float64)
        return centers[_canonical_order_line(centers)]

    def sq_dist(self, rows: np.ndarray, centers: np.ndarray) -> np.ndarray:
        """Squared distances (n, k), float64, of ``rows`` (n, d) to ``centers`` (k, d): Poincaré or Euclidean."""
        rows = np.asarray(rows, dtype=np.float64)
        if self.kind == "ball":
            from .kmeans import poincare_pdist2

            return poincare_pdist2(rows, centers, c=self.curvature)
        # one centre at a time: (n, d) temporaries, not two (n, k, d) ones (256 MB for a
        # million rows at k = 8, d = 2); the same sums, so the same bits
        centers = np.asarray(centers, dtype=np.float64)
        out = np.empty((len(rows), len(centers)))
        diff = np.empty_like(rows)
        for j, center in enumerate(centers):
            np.subtract(rows, center, out=diff)
            np.square(diff, out=diff)
            diff.sum(axis=-1, out=out[:, j])
        return out

    def labels(
        self,
        features: np.ndarray,
        centers: np.ndarray,
        smooth: float,
        inside: np.ndarray | None = None,
    ) -> np.ndarray:
        """Labels (X, Y, Z) of ``features`` (X, Y, Z, d): nearest centre, Potts-smoothed when
        ``smooth`` > 0 (over the voxels ``inside`` only, where given; see
        :func:`hypsegcli.smoothing.smooth_labels`)."""
        if smooth > 0:
            from .smoothing import smooth_labels

            return smooth_labels(
                features, centers, self.sq_dist, beta=smooth, device=self.device, inside=inside
            )
        flat = features.reshape(-1, features.shape[-1])
        return self.predict(flat, centers).reshape(features.shape[:-1])

    def predict(
        self, features: np.ndarray, centers: np.ndarray, *, block: int | None = None
    ) -> np.ndarray:
        """Label (the nearest centre) of every row of ``features`` (n, d), in the smallest unsigned dtype.

        In chunks of about ``block`` (default ``PREDICT_BLOCK``) rows, so a
        memory-mapped cache entry is read piece by piece and nothing of size
        (n, k) or a float64 copy of all rows is ever made; the labels equal
        those of one call on all rows.
        """
        block = PREDICT_BLOCK if block is None else block
        k = len(centers)
        out = np.empty(len(features), dtype=np.min_scalar_type(max(k - 1, 0)))
        if self.kind == "ball":
            from .kmeans import PoincareKMeans, assign_chunk_rows

            km = PoincareKMeans(n_clusters=k, c=self.curvature)
            km.cluster_centers_ = centers
            step = assign_chunk_rows(k)
            step *= max(1, int(block) // step)  # whole assignment chunks: same labels
            for start in range(0, len(features), step):
                out[start : start + step] = km.predict(features[start : start + step])
            return out
        step = min(int(block), 1 << 20)
        for start in range(0, len(features), step):
            d2 = self.sq_dist(features[start : start + step], centers)
            out[start : start + len(d2)] = d2.argmin(1)
        return out


def _intensity_features(data: np.ndarray, name: str) -> np.ndarray:
    from .sampling import normalize_volume

    return normalize_volume(data, name=name)[..., None]


def load_centroids(
    path: Path,
    ks: list[int],
    features: str,
    geometry: str | None = None,
    *,
    dim: int | None = None,
    curvature: float | None = None,
    model_content_sha256: str | None = None,
    patch_size: float | None = None,
) -> dict[int, np.ndarray]:
    """The pooled centroids of a ``centroids.json`` (``cluster --centroids``) for every k in ``ks``.

    Refuses (naming the file) another format, features, distance (``geometry``) or ball
    curvature than this run's, embeddings of another model (``model_content_sha256``: its
    weights and configuration) or patch size, and any set that is not k finite points of
    dimension ``dim`` (inside the ball of curvature -``curvature`` for Poincaré
    distances). Another ``--stride`` is accepted: the embedding is the same, interpolated
    between other lattice points.
    """
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
    if geometry is not None and doc.get("geometry", geometry) != geometry:
        raise BadInputError(
            f"{path}: centroids were fitted with {doc.get('geometry')} distances, "
            f"this run uses {geometry} (--metric)"
        )
    if geometry == "poincare" and curvature is not None:
        theirs = doc.get("curvature", curvature)
        if not isinstance(theirs, (int, float)) or not math.isclose(
            float(theirs), curvature, rel_tol=1e-9
        ):
            raise BadInputError(
                f"{path}: centroids were fitted on a ball of curvature -{theirs}, this "
                f"model's is -{curvature:g}"
            )
    theirs = doc.get("model_content_sha256")
    if model_content_sha256 is not None and theirs is not None and theirs != model_content_sha256:
        raise BadInputError(
            f"{path}: centroids were fitted on the embeddings of another model "
            f"({doc.get('model')}, content {str(theirs)[:12]}; this one's is "
            f"{model_content_sha256[:12]}): fit them again with this model (--fit-on pooled)"
        )
    theirs = doc.get("patch_size")
    if patch_size is not None and theirs is not None and theirs != patch_size:
        raise BadInputError(
            f"{path}: centroids were fitted on embeddings of --patch-size {theirs}, "
            f"this run uses {patch_size}"
        )
    sets = doc.get("sets", [])
    if not isinstance(sets, list):
        raise BadInputError(f"{path}: 'sets' should be a list of centroid sets")
    pooled: dict[int, np.ndarray] = {}
    for i, s in enumerate(sets):
        if not isinstance(s, dict):
            raise BadInputError(f"{path}: set {i} is not an object")
        if s.get("case") is not None:
            continue
        k, centers = _checked_centers(
            path, i, s, dim, curvature if geometry == "poincare" else None
        )
        if k in pooled and not np.array_equal(pooled[k], centers):
            raise BadInputError(
                f"{path}: holds different pooled centroids for k={k} (volumes of that folder "
                "were labelled with different fits); fit them again into a new folder"
            )
        pooled[k] = centers
    missing = [k for k in ks if k not in pooled]
    if missing:
        raise BadInputError(
            f"{path}: no pooled centroids for k={', '.join(map(str, missing))} (fit them with --fit-on pooled)"
        )
    return pooled


def _checked_centers(
    path: Path, i: int, entry: dict[str, Any], dim: int | None, curvature: float | None
) -> tuple[int, np.ndarray]:
    """Set ``i`` of a centroids file as (k, centers): k >= 1 rows of ``dim`` finite numbers,
    inside the ball of curvature -``curvature`` when given."""
    k = entry.get("k")
    if not is_whole(k, 1):
        raise BadInputError(f"{path}: set {i} has k={k!r}; expected a whole number >= 1")
    try:
        centers = np.asarray(entry.get("centers"), dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInputError(
            f"{path}: set {i} (k={k}): centers are not a table of numbers"
        ) from None
    width = dim if dim is not None else (centers.shape[1] if centers.ndim == 2 else 0)
    if centers.shape != (k, width) or width < 1:
        want = f"({k}, {dim})" if dim is not None else f"({k}, d)"
        raise BadInputError(
            f"{path}: set {i} (k={k}): centers of shape {centers.shape}, expected {want}"
        )
    if not np.isfinite(centers).all():
        raise BadInputError(f"{path}: set {i} (k={k}): centers hold NaN or infinite values")
    if curvature is not None:
        radius = float(np.linalg.norm(centers, axis=1).max())
        if radius >= 1.0 / math.sqrt(curvature):
            raise BadInputError(
                f"{path}: set {i} (k={k}): a centre of norm {radius:g} lies outside the ball "
                f"of curvature -{curvature:g} (radius {1.0 / math.sqrt(curvature):g})"
            )
    return k, centers


#: Per-case centroid records beside the label volumes: ``OUT/<case>.centroids.json``.
CASE_CENTROIDS_SUFFIX = ".centroids.json"
CASE_CENTROIDS_FORMAT = "hypseg-case-centroids"
#: Header fields that must agree for centroid records to be merged or outputs reused.
_IDENTITY = (
    "features",
    "geometry",
    "curvature",
    "patch_size",
    "stride",
    "smooth",
    "snap",
    "mrf",
    "nest",
    "min_size",
    "mask",
)


def _edge_image(data: np.ndarray, path: Path) -> np.ndarray:
    """The intensities ``--snap`` and ``--mrf`` work on: scaled between percentiles 1 and 99
    (:func:`normalize_volume`, whatever the model's own normalisation), or between the
    minimum and maximum where those percentiles are equal (a volume of more than 99%
    background, say, which a z-score model can still embed)."""
    from .sampling import normalize_volume

    try:
        return normalize_volume(data, name=str(path))
    except BadInputError:
        log.debug("%s: percentiles 1 and 99 are equal; --snap and --mrf use min-max", path)
        return normalize_volume(data, 0.0, 100.0, name=str(path))


def _case_centroids_path(out: Path, name: str) -> Path:
    return out / f"{name}{CASE_CENTROIDS_SUFFIX}"


def _is_case_record(doc: Any) -> bool:
    """``doc`` has the shape of the per-case centroid record ``cluster`` writes. One edited
    or damaged by hand (a list where a number belongs, say) counts as no record: the case is
    redone, the merged file and ``evaluate`` leave it out, rather than failing on it."""
    if not (
        isinstance(doc, dict)
        and doc.get("format") == CASE_CENTROIDS_FORMAT
        and isinstance(doc.get("header"), dict)
        and isinstance(doc.get("sets"), list)
        and isinstance(doc.get("fit"), str)
        and isinstance(doc.get("case", ""), str)
        and isinstance(doc.get("source", {}), dict)
        and isinstance(doc.get("params", {}), dict)
    ):
        return False
    for entry in doc["sets"]:
        if not (
            isinstance(entry, dict)
            and is_whole(entry.get("k"), 0)
            and all(entry.get(key) is None or is_whole(entry[key], 0) for key in _SET_COUNTS)
            and isinstance(entry.get("centers"), list)
        ):
            return False
        try:
            centers = np.asarray(entry["centers"], dtype=np.float64)
        except (TypeError, ValueError):  # ragged, or not numbers
            return False
        if centers.ndim != 2 or not np.isfinite(centers).all():
            return False
    return True


#: The whole numbers of a record's set (None in records of earlier versions).
_SET_COUNTS = ("nested_in", "bytes", "preview_bytes")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same model: the same weights, configuration and normalisation where both headers
    record them (``model_content_sha256``: a retrained or re-saved file whose weights are
    the same counts), else (records of earlier versions) the same file bytes."""
    if a.get("model_content_sha256") is not None and b.get("model_content_sha256") is not None:
        return a["model_content_sha256"] == b["model_content_sha256"]
    return a.get("model_sha256") == b.get("model_sha256")


def _same_identity(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _same_model(a, b) and all(a.get(key) == b.get(key) for key in _IDENTITY)


def _case_record_matches(
    doc: Any, header: dict[str, Any], fit: str, params: dict[str, Any]
) -> bool:
    """``doc`` is a per-case record made the same way (model, options, fitting mode)."""
    return (
        _is_case_record(doc)
        and _same_identity(doc["header"], header)
        and doc.get("fit") == fit
        and (fit == "centroids" or doc.get("params") == params)
    )


def _case_outputs(out: Path, path: Path, ks: list[int], preview: bool) -> list[Path]:
    """The files ``cluster`` writes for one input (its centroid record last)."""
    pairs = [_case_k_outputs(out, path, k) for k in ks]
    files = [labels for labels, _ in pairs]
    if preview:
        files += [png for _, png in pairs]
    return [*files, _case_centroids_path(out, case_name(path))]


def _case_k_outputs(out: Path, path: Path, k: int) -> tuple[Path, Path]:
    """The label volume and the preview ``cluster`` writes for one input and k."""
    name, suffix = case_name(path), volume_suffix(path) or ".nii.gz"
    return out / f"{name}_k{k}{suffix}", out / f"{name}_k{k}.png"


def _check_outputs_are_not_inputs(
    out: Path, paths: list[Path], ks: list[int], preview: bool, masks: Sequence[Path] = ()
) -> None:
    """No file ``cluster`` would write into ``out`` is one of the inputs or masks, and each
    one's name fits file systems' limit (a case name of 245 bytes does not)."""
    inputs = {entry_path(p) for p in [*paths, *masks]}
    folder = entry_path(out / "centroids.json").parent  # every output lies directly in it
    for path in paths:
        for target in [*_case_outputs(out, path, ks, preview), out / "centroids.json"]:
            check_name_length(target, f"the output named after {path} (rename it shorter)")
            if folder / target.name in inputs:
                raise BadInputError(
                    f"{target}: is one of the inputs; cluster -o {out} would overwrite it "
                    "(choose another output folder)"
                )


class _Masks:
    """``cluster --mask``: which mask belongs to which input, and reading it.

    ``spec`` is one mask file for every input, or a folder holding one per
    input, named ``<case>`` or ``<case>_mask`` with any volume suffix. Any
    non-zero voxel is inside. Problems are found before any work: a missing
    folder or file, an input without its mask, a mask that is also an input.
    """

    def __init__(
        self, spec: Path, inputs: list[Path], all_inputs: list[Path], *, recursive: bool = False
    ) -> None:
        spec = Path(spec)
        self._grid_warned: set[Path] = set()
        if not spec.exists():
            raise BadInputError(f"--mask {spec}: no such file or folder")
        if spec.is_dir():
            found: dict[str, list[Path]] = {}
            inputs_at = {entry_path(p) for p in all_inputs}
            # (a folder the inputs were listed from, masks beside images, said its stray
            # files then)
            listed = {entry_path(p).parent for p in all_inputs}
            quiet = entry_path(spec / "x").parent in listed
            try:
                masks = collect_inputs(
                    [spec], recursive=recursive, warn=(lambda _m: None) if quiet else None
                )
            except BadInputError as exc:
                raise BadInputError(f"--mask {spec}: {exc}") from None
            for path in masks:
                found.setdefault(case_name(path), []).append(path)
            self.paths: dict[Path, Path] = {}
            missing = []
            for path in inputs:
                name = case_name(path)
                # BIDS first: an fMRIPrep anat folder holds the image itself beside its mask
                match = self._bids_mask(spec, path, masks)
                if match is None:
                    candidates = [*found.get(name, []), *found.get(f"{name}_mask", [])]
                    if len(candidates) > 1:  # the input itself, in a folder of both, is none
                        masks_only = [m for m in candidates if entry_path(m) not in inputs_at]
                        if len(masks_only) > 1:  # which one was meant: say so, not guess
                            raise BadInputError(
                                f"--mask {spec}: {len(masks_only)} masks of {path.name}: "
                                f"{_few([os.path.relpath(m, spec) for m in masks_only])} (keep "
                                "one <case> or <case>_mask per input, or give the file of one)"
                            )
                        candidates = masks_only or candidates
                    match = candidates[0] if candidates else None
                if match is None:
                    missing.append(name)
                else:
                    self.paths[path] = match
            if missing:
                raise BadInputError(
                    f"--mask {spec}: no mask for {len(missing)} input(s): {_few(missing)} "
                    "(looked for <case> and <case>_mask with a volume suffix, and for BIDS "
                    "names the same entities with any desc and the suffix mask)"
                )
        else:
            if volume_suffix(spec) is None:
                raise BadInputError(f"--mask {spec}: not a volume file (NIfTI or MRC) or folder")
            self.paths = dict.fromkeys(inputs, spec)
        entries = {entry_path(p) for p in all_inputs}
        for mask in dict.fromkeys(self.paths.values()):
            if entry_path(mask) in entries:
                raise BadInputError(
                    f"{mask}: is both an input and a mask (keep the masks in another folder)"
                )

    @staticmethod
    def _bids_mask(spec: Path, path: Path, masks: list[Path]) -> Path | None:
        """The one BIDS mask of input ``path`` among ``masks`` (``desc-brain`` where
        fMRIPrep also wrote others, e.g. ``desc-ribbon``), or None."""
        bids = bids_match(case_name(path), masks, "mask")
        if len(bids) > 1:
            brain = [m for m in bids if "_desc-brain_" in f"_{case_name(m)}"]
            if len(brain) != 1:
                raise BadInputError(
                    f"--mask {spec}: {len(bids)} masks of {path.name}: "
                    f"{_few([m.name for m in bids])} (give the folder or file of one)"
                )
            bids = brain
        return bids[0] if bids else None

    def files(self) -> list[Path]:
        return list(dict.fromkeys(self.paths.values()))

    def read(self, path: Path, volume: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """The mask of input ``path`` (read as ``volume``) as a bool array, and its record
        (file stamp, SHA-256 of its voxels and of the inside)."""
        mask_path = self.paths[path]
        stamp = _source_stamp(mask_path)
        mask = read_volume(mask_path)
        if mask.data.shape != volume.data.shape:
            raise BadInputError(
                f"{mask_path}: mask of shape {mask.data.shape}, but {path} has shape "
                f"{volume.data.shape}"
            )
        if path not in self._grid_warned:  # (a pooled fit reads each mask twice)
            self._grid_warned.add(path)
            _warn_if_other_grid(
                mask_path,
                mask.geometry,
                path,
                volume.geometry,
                "the mask is applied voxel by voxel",
            )
        inside = mask.data != 0
        if not inside.any():
            raise BadInputError(f"{mask_path}: the mask of {path} is empty (no non-zero voxel)")
        record = {
            **(stamp or {}),
            "path": str(mask_path),
            "sha256": array_sha256(mask.data),
            "inside_sha256": array_sha256(inside.view(np.uint8)),
            "inside": int(np.count_nonzero(inside)),
        }
        return inside, record


#: Stamp keys compared only when a record has them (records of earlier versions have only
#: the size and modification time).
_STAMP_EXTRA = ("ctime_ns", "inode", "device", "realpath")


def _refuse_foreign_record(path: Path, fmt: str, beside: Path | None = None) -> None:
    """BadInputError if ``path`` exists and is not a record of format ``fmt`` that this
    tool wrote, which a run would replace: ``embed -o`` into a BIDS folder would overwrite
    ``sub-01_T1w.json``, the sidecar of ``sub-01_T1w.nii``. A file that is not JSON at all
    is taken for a damaged record of ours, and replaced, when ``beside`` (our array) exists."""
    if not path.exists():
        return
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if beside is not None and beside.exists():
            return
        doc = None
    if not (isinstance(doc, dict) and doc.get("format") == fmt):
        raise BadInputError(
            f"{path}: exists and is not a hypseg record ({fmt}); not overwritten "
            "(a sidecar of the input? choose another -o folder)"
        )


def _source_stamp(path: Path) -> dict[str, Any] | None:
    """Size, modification and change times, inode, device and resolved path of an input
    file (None if it cannot be read): all equal, the file has not been touched since."""
    try:
        st = path.stat()
        real = str(path.resolve())
    except (OSError, RuntimeError):
        return None
    return {
        "size": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "ctime_ns": int(st.st_ctime_ns),
        "inode": int(st.st_ino),
        "device": int(st.st_dev),
        "realpath": real,
    }


def _source_record(stamp: dict[str, Any] | None, sha: str, volume: Any) -> dict[str, Any]:
    """What a record keeps of the input it was made from, for :func:`_same_source`: the
    file's stamp (:func:`_source_stamp`, taken before reading it), its voxels' SHA-256 and
    its geometry and header's (:func:`~hypsegcli.io.geometry_sha256`)."""
    return {**(stamp or {}), "sha256": sha, "geometry_sha256": geometry_sha256(volume.geometry)}


@contextlib.contextmanager
def _reading_warnings_muted() -> Any:
    """hypseg's own warnings held back (errors still shown), e.g. while an input is read
    only to compare it with a record: its warnings come when it is read for its work."""
    package = logging.getLogger(__name__.rpartition(".")[0])
    level = package.level
    package.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        package.setLevel(level)


def _same_source(recorded: Any, path: Path, *, geometry: bool = True) -> bool:
    """``path`` holds the input a per-case record was made from: the same file untouched
    (:func:`_source_stamp`: size, modification and change times, inode, device and
    resolved path; a record of an earlier version has only the size and modification
    time), or else (another file, copied, touched, synthesised again) the same voxels and,
    with ``geometry`` (an input, whose outputs copy its header; not a mask), the same
    geometry and header (:func:`~hypsegcli.io.geometry_sha256`). So another file of the
    same size and modification time (archives keep those) is read and compared."""
    if not isinstance(recorded, dict):
        return False
    stamp = _source_stamp(path)
    if stamp is None:
        return False
    if all(
        recorded.get(key) == value
        for key, value in stamp.items()
        if key not in _STAMP_EXTRA or key in recorded
    ):
        return True
    keys = ("sha256", "geometry_sha256") if geometry else ("sha256",)
    if not all(isinstance(recorded.get(key), str) for key in keys):
        return False  # a record of an older version without the geometry: redo the case
    try:
        with _reading_warnings_muted():  # (a case redone reads it again and says them once)
            volume = read_volume(path, quiet=True)
    except Exception:  # noqa: BLE001 - unreadable now: not done; the run reports why
        return False
    if array_sha256(volume.data) != recorded["sha256"]:
        return False
    return not geometry or geometry_sha256(volume.geometry) == recorded["geometry_sha256"]


def _case_done(
    out: Path,
    path: Path,
    ks: list[int],
    *,
    preview: bool,
    header: dict[str, Any],
    fit: str,
    params: dict[str, Any],
    fixed: dict[int, np.ndarray] | None,
    nest: float = 0.0,
    mask: Path | None = None,
) -> bool:
    """All outputs of ``path`` exist and its centroid record (written last) covers ``ks``, same model and options.

    Each k's set must also be nested in the same k as this run would nest it
    (``nest``; a set for k = 4 made with ``--k 2 --k 4`` is not one made with
    ``--k 4`` alone), and the record must have been made from this input as it
    is now (:func:`_same_source`), with ``mask`` (``cluster --mask``) as it is now.
    """
    if not all(f.is_file() for f in _case_outputs(out, path, ks, preview)):
        return False
    doc = _read_json(_case_centroids_path(out, case_name(path)))
    if not _case_record_matches(doc, header, fit, params):
        return False
    if not _same_source(doc.get("source"), path):
        return False
    if mask is not None and not _same_source(doc["source"].get("mask"), mask, geometry=False):
        return False
    sets = {s["k"]: s for s in doc["sets"]}
    if not all(k in sets and sets[k].get("nested_in") == _nested_in(k, ks, nest) for k in ks):
        return False
    for k in ks:  # the sizes written (records of earlier versions have none)
        labels, png = _case_k_outputs(out, path, k)
        written = [(labels, sets[k].get("bytes"))]
        if preview:
            if sets[k].get("bytes") is not None and sets[k].get("preview_bytes") is None:
                return False  # this set was written without a preview: a PNG there is older
            written.append((png, sets[k].get("preview_bytes")))
        if any(size is not None and _file_size(file) != size for file, size in written):
            return False
    if fit == "centroids" and fixed is not None:
        return all(
            np.array_equal(np.asarray(sets[k].get("centers"), dtype=np.float64), fixed[k])
            for k in ks
        )
    return True


def _file_size(path: Path) -> int | None:
    """Size of a file in bytes (None if it cannot be read)."""
    try:
        return int(path.stat().st_size)
    except OSError:
        return None


def _same_header(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Two source records have the same geometry and header: the same hash, or (a record of
    an older version, without one) the same file size and modification time."""
    if "geometry_sha256" in old:
        return old["geometry_sha256"] == new.get("geometry_sha256")
    return all(old.get(key) == new.get(key) is not None for key in ("size", "mtime_ns"))


def _inside_sha(source: dict[str, Any]) -> str | None:
    mask = source.get("mask")
    return mask.get("inside_sha256") if isinstance(mask, dict) else None


def _take_case_record(out: Path, name: str, ks: Sequence[int]) -> Any:
    """Read ``OUT/<case>.centroids.json`` and take this run's ``ks`` out of it before a
    case's outputs for them are rewritten: the record is written last and says the outputs
    are complete, so an interrupted rewrite must not leave it listing them beside new label
    files (a resubmission would skip the case). Its sets for other k stay on record (their
    files are untouched): a run stopped here loses none of them. Returns the whole record."""
    target = _case_centroids_path(out, name)
    old = _read_json(target) if target.exists() else None
    sets = old.get("sets") if isinstance(old, dict) else None
    kept = (
        [
            s
            for s in sets
            if isinstance(s, dict) and isinstance(s.get("k"), int) and s["k"] not in ks
        ]
        if isinstance(sets, list)
        else []
    )
    if kept:
        write_text_atomic(target, json.dumps({**old, "sets": kept}, indent=2) + "\n")
    else:
        _remove_if_present(target)
    return old


def _remove_replaced_format(target: Path, old: Any, k: int) -> None:
    """Once ``target`` (``OUT/<case>_k<k><suffix>``) is written: the label volume of the
    same case and k in another format that the replaced record ``old`` lists (an earlier
    run of a same-named input: ``a.nii`` there, ``a.mrc`` now) is removed. Beside the new
    one it would be scored too (``evaluate`` refuses two files of one case name), and the
    record that vouched for it is gone. Only a file of the size that record gives is taken;
    any other is left, with a warning."""
    if not isinstance(old, dict) or not isinstance(old.get("volume"), str):
        return
    suffix = volume_suffix(old["volume"])
    if suffix is None or suffix == volume_suffix(target):
        return
    stale = _case_k_outputs(target.parent, Path(old["volume"]), k)[0]
    if not stale.is_file():
        return
    sets = old.get("sets") if isinstance(old.get("sets"), list) else []
    sizes = [s.get("bytes") for s in sets if isinstance(s, dict) and s.get("k") == k]
    if sizes and sizes[0] == _file_size(stale):
        _remove_if_present(stale)
        log.warning(
            "%s: removed, the labels of %s that an earlier run wrote (this run's %s replaces them)",
            stale,
            old["volume"],
            target.name,
        )
    else:
        log.warning(
            "%s: left as it is (not the size the earlier record gave); it has the case name of "
            "%s, and evaluate would score both",
            stale,
            target.name,
        )


def _remove_if_present(path: Path) -> None:
    """Remove ``path`` (none there is fine): a record that says its outputs are complete,
    before they are rewritten; an earlier run's model that ``train --overwrite`` replaces."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HypsegError(f"{path}: cannot remove ({exc.strerror or exc})") from None


def _write_case_centroids(
    out: Path,
    volume: Any,
    *,
    header: dict[str, Any],
    fit: str,
    params: dict[str, Any],
    sets: list[dict[str, Any]],
    source: dict[str, Any],
    old: Any = None,
) -> Path:
    """Write ``OUT/<case>.centroids.json`` (atomically), keeping the sets of ``old`` (the
    record this run took away before rewriting the case, see :func:`_take_case_record`) for
    other k made the same way from the same voxels (``source``: :func:`_source_stamp`, taken
    before reading the input, plus the ``sha256`` of its voxels and the ``geometry_sha256``
    of its geometry and header)."""
    target = _case_centroids_path(out, volume.name)
    new_ks = {int(s["k"]) for s in sets}
    kept = []
    old_source = old.get("source") if isinstance(old, dict) else None
    if (
        _case_record_matches(old, header, fit, params)
        and isinstance(old_source, dict)
        and old_source.get("sha256") == source.get("sha256")
        and _same_header(old_source, source)
        and _inside_sha(old_source) == _inside_sha(source)
    ):
        kept = [s for s in old["sets"] if isinstance(s, dict) and int(s.get("k", 0)) not in new_ks]
    doc = {
        "format": CASE_CENTROIDS_FORMAT,
        "case": volume.name,
        "volume": str(volume.path),
        "source": source,
        "fit": fit,
        "params": params,
        "header": header,
        "sets": sorted([*kept, *sets], key=lambda s: int(s["k"])),
    }
    write_text_atomic(target, json.dumps(doc, indent=2) + "\n")
    return target


def _merge_centroids(out: Path, header: dict[str, Any]) -> Path:
    """Rebuild ``OUT/centroids.json`` from every ``OUT/<case>.centroids.json`` (safe for concurrent parts).

    Per-volume fits become sets with their case name; pooled or applied
    centroids (the same for many cases) become one set per k with case null.
    Records made with another model or options are left out with a warning.
    """
    from .batch import rebuild_merged

    target = out / "centroids.json"
    left_out: list[str] = []
    damaged: list[str] = []  # not JSON, or not shaped as cluster writes it
    shared_by: dict[tuple[int, str], list[str]] = {}  # the cases of each pooled set

    def parts() -> list[Path]:
        try:
            return [
                p
                for p in out.iterdir()
                if p.name.endswith(CASE_CENTROIDS_SUFFIX) and not p.name.startswith(".")
            ]
        except FileNotFoundError:
            return []

    def build(files: list[Path]) -> str:
        left_out.clear()
        damaged.clear()
        shared_by.clear()
        pooled: dict[tuple[int, str], dict[str, Any]] = {}
        per_case: list[dict[str, Any]] = []
        for f in files:
            doc = _read_json(f)
            if not _is_case_record(doc):
                if doc is not None or f.exists():  # (not one a concurrent run just removed)
                    damaged.append(f.name)
                continue
            if not _same_identity(doc["header"], header):
                left_out.append(f.name)
                continue
            for entry in doc["sets"]:
                k, centers = entry["k"], entry["centers"]
                if doc.get("fit") == "volume":
                    per_case.append(
                        {
                            "case": doc.get("case"),
                            "k": k,
                            "nested_in": entry.get("nested_in"),
                            "centers": centers,
                        }
                    )
                else:
                    key = (k, json.dumps(centers))
                    pooled.setdefault(key, {"case": None, "k": k, "centers": centers})
                    shared_by.setdefault(key, []).append(str(doc.get("case")))
        sets = sorted(pooled.values(), key=lambda s: s["k"]) + sorted(
            per_case, key=lambda s: (str(s["case"]), s["k"])
        )
        return json.dumps({"format": "hypseg-centroids", **header, "sets": sets}, indent=2) + "\n"

    try:
        rebuild_merged(target, parts, build)
    except OSError as exc:
        raise HypsegError(f"{target}: cannot write ({exc.strerror or exc})") from None
    mixed: dict[int, list[list[str]]] = {}  # k: the cases of each of its pooled sets
    for k in sorted({k for k, _ in shared_by}):
        groups = sorted(sorted(cases) for (kk, _), cases in shared_by.items() if kk == k)
        if len(groups) > 1:  # e.g. a pooled fit of some cases into an earlier one's folder
            mixed[k] = groups
    if mixed:
        first = next(iter(mixed.values()))
        log.warning(
            "%s: the cases here were labelled by different pooled (or applied) centroid sets "
            "for k=%s (%s), whose label numbers need not agree: fit them all in one run (or "
            "write a new fit to a new folder)",
            target,
            ", ".join(map(str, mixed)),
            " | ".join(_few(cases, 3) for cases in first),
        )
    if left_out:
        log.warning(
            "%s: left out %d centroid record(s) made with another model or options (%s%s)",
            target,
            len(left_out),
            ", ".join(left_out[:3]),
            ", ..." if len(left_out) > 3 else "",
        )
    if damaged:
        log.warning(
            "%s: left out %d centroid record(s) that are not as cluster writes them "
            "(damaged, or edited?): %s",
            target,
            len(damaged),
            _few(damaged),
        )
    return target


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
    n_init: int = 2,
    select: str = "inertia",
    fit_samples: int = 200_000,
    metric: str = "auto",
    smooth: float = 0.0,
    snap: float = 0.0,
    mrf: float = 0.0,
    nest: float = 0.0,
    min_size: int = 0,
    mask: Path | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    cache_dir: Path | None = None,
    preview: bool = False,
    recursive: bool = False,
    skip_existing: bool = True,
    num_parts: int | None = None,
    part_id: int | None = None,
    dry_run: bool = False,
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segment each volume into k clusters for every k; write ``OUT/<case>_k<K>`` and centroids.

    Labels are numbered 0..k-1 canonically: hyperbolic embeddings by the
    centroid's distance from the origin of the ball (then by angle), Euclidean
    embeddings and intensities by the centroid's coordinates, so the same
    structure gets the same number across runs. ``fit_on="pooled"`` fits one
    set of centroids on all inputs together so numbers agree across volumes;
    ``centroids`` applies saved pooled centroids instead of fitting.

    ``metric`` is the distance of k-means and of every later step that uses
    distances to centroids: ``"auto"`` the features' own (Poincaré for a
    hyperbolic model, else Euclidean), ``"poincare"`` (hyperbolic models
    only) or ``"euclidean"``, which clusters a hyperbolic model's ball
    points with Euclidean k-means on their coordinates.

    ``smooth`` > 0 Potts-smooths each label map (:mod:`hypsegcli.smoothing`);
    ``snap`` > 0 then moves voxels near label boundaries to the side whose
    local intensity they match (:func:`hypsegcli.edges.snap_labels`, Gaussian
    of ``snap`` voxels); ``mrf`` > 0 then re-decides the voxels near
    boundaries between labels of distinct intensity with an intensity MRF of
    Potts weight ``mrf`` (:func:`hypsegcli.edges.refine_labels`).

    ``nest`` > 0 (with several k) nests every larger k in the smallest k's
    labels (:mod:`hypsegcli.nesting`): the per-volume fit leaves out the
    voxels within ``nest`` voxels of a boundary of those labels, and those
    voxels take the label of the nearest voxel of their own coarse region
    outside that band, before ``snap`` and ``mrf``. A pooled fit or given
    centroids use every voxel; the band's labels are taken all the same.

    ``min_size`` > 1, the last step, relabels every connected piece of a label
    under ``min_size`` voxels from its surroundings
    (:func:`hypsegcli.components.remove_small_components`); the smallest k's
    labels that ``nest`` uses are those before this step.

    Centroids: each case's sets go to ``OUT/<case>.centroids.json``, written
    after its label volumes; ``OUT/centroids.json`` is then rebuilt from all
    of them (:func:`_merge_centroids`), so parts writing into one folder never
    lose each other's sets.

    Batch behaviour: with parts only this part's share of the sorted inputs is
    processed (``fit_on="pooled"`` needs all inputs: refused with parts unless
    ``centroids`` is given). ``skip_existing`` skips a volume whose label
    volumes (and previews) for every k exist and whose centroid record covers
    every k with the same model, options and fitting mode. A volume that
    fails is reported in ``failures`` and the others go on. A run record is
    appended to ``OUT/hypseg-runs.jsonl``. ``dry_run`` returns the plan.
    """
    from .cache import EmbeddingCache, resolve_cache_dir
    from .components import remove_small_components
    from .edges import noise_std, refine_labels, snap_labels
    from .embedding import DEFAULT_TILE
    from .nesting import band_mask, band_sources, bare_labels, fill_band
    from .preview import window_levels, write_preview
    from .training import resolve_device

    progress = progress or _noop
    if not ks:
        raise BadInputError("give at least one --k")
    bad = [k for k in ks if k < 2]
    if bad:
        raise BadInputError(f"--k {bad[0]}: should be >= 2")
    ks = sorted(dict.fromkeys(ks))
    if fit_samples < ks[-1]:
        raise BadInputError(
            f"--fit-samples {fit_samples}: should be at least the largest --k ({ks[-1]})"
        )
    # Potts weights above ~1e6 overflow the float32 marginals; a Gaussian of 1000 voxels
    # is wider than any volume
    if not (isinstance(smooth, (int, float)) and 0 <= smooth <= MAX_POTTS):
        raise BadInputError(f"--smooth {smooth}: should be a number from 0 to {MAX_POTTS:g}")
    if not (isinstance(snap, (int, float)) and 0 <= snap <= MAX_SNAP):
        raise BadInputError(f"--snap {snap}: should be a number from 0 to {MAX_SNAP:g} voxels")
    if not (isinstance(mrf, (int, float)) and 0 <= mrf <= MAX_POTTS):
        raise BadInputError(f"--mrf {mrf}: should be a number from 0 to {MAX_POTTS:g}")
    if not (isinstance(nest, (int, float)) and nest >= 0 and np.isfinite(nest)):
        raise BadInputError(f"--nest {nest}: should be a finite number >= 0")
    if not is_whole(min_size, 0):
        raise BadInputError(f"--min-size {min_size}: should be a whole number >= 0")
    if features not in ("embedding", "intensity"):
        raise BadInputError(f"--features {features!r}: expected embedding or intensity")
    if metric not in ("auto", "poincare", "euclidean"):
        raise BadInputError(f"--metric {metric!r}: expected auto, poincare or euclidean")
    if fit_on not in ("volume", "pooled"):
        raise BadInputError(f"--fit-on {fit_on!r}: expected volume or pooled")
    if features == "embedding" and model_path is None:
        raise BadInputError("--model is required with --features embedding")
    _check_embedding_options(patch_size, stride)
    if features == "intensity":
        ignored = [
            f"{name} {value}"
            for name, value, default in (
                ("--patch-size", patch_size, 5),
                ("--stride", stride, 1),
                ("--model", model_path, None),
            )
            if value != default
        ]
        if ignored:
            log.warning(
                "--features intensity clusters the voxel values: %s %s to embeddings only "
                "and %s ignored",
                ", ".join(map(str, ignored)),
                "applies" if len(ignored) == 1 else "apply",
                "is" if len(ignored) == 1 else "are",
            )
    set_threads(threads)
    paths = collect_inputs(inputs, recursive=recursive)
    check_unique_cases(paths, why=f"their segmentations in {out} would overwrite each other")
    part = resolve_part(num_parts, part_id, environ)
    if fit_on == "pooled" and centroids is not None:
        raise BadInputError(
            "--centroids applies centroids fitted before: it cannot be combined with "
            "--fit-on pooled"
        )
    if fit_on == "pooled" and centroids is None and part.split:
        raise BadInputError(
            f"--fit-on pooled needs all inputs in one run, but this is {part.describe()}: "
            "fit the centroids first in one job (hypseg cluster ... --fit-on pooled --num-parts 1 -o FIT), "
            "then run the parts with --centroids FIT/centroids.json"
        )
    selected = _select_part(paths, part)
    out = Path(out)
    masks = _Masks(mask, selected, paths, recursive=recursive) if mask is not None else None
    # checked here, made (and probed for writing) once the model and options have passed
    check_output_folder(out, inputs, recursive=recursive, what="cluster -o", create=False)
    _check_no_folder_at(Path(out), ["centroids.json", MANIFEST_NAME], what="cluster -o")
    _check_outputs_are_not_inputs(out, paths, ks, preview, masks.files() if masks else ())
    model = LoadedModel(model_path, device) if features == "embedding" else None
    kind = (
        "ball"
        if model is not None
        and model.document["model_config"].get("geometry", "hyperbolic") == "hyperbolic"
        else "line"
    )
    if metric == "poincare" and kind != "ball":
        what = "not --features intensity" if model is None else f"{model_path} is Euclidean"
        raise BadInputError(f"--metric poincare needs a hyperbolic model ({what})")
    if metric == "euclidean":
        kind = "line"
    curvature = float(model.document["model_config"].get("curvature", 1.0)) if model else 1.0
    clusterer = _Clusterer(
        kind,
        curvature=curvature,
        n_init=n_init,
        fit_samples=fit_samples,
        seed=seed,
        select=select,
        # with intensities, --device is checked as a model's would be and used as given
        device=model.device if model is not None else resolve_device(device),
    )
    header = {
        "features": features,
        "geometry": "poincare" if kind == "ball" else "euclidean",
        "curvature": curvature if kind == "ball" else None,
        "model": str(model_path) if model_path else None,
        "model_sha256": model.sha256 if model else None,
        "model_content_sha256": model.content_sha256 if model else None,
        "patch_size": patch_size if model else None,
        "stride": stride if model else None,
        "order": "by distance from the origin, then angle" if kind == "ball" else "by coordinates",
        "smooth": float(smooth),
        "snap": float(snap),
        "mrf": float(mrf),
        # the band width; each set records the k it was nested in (``nested_in``)
        "nest": float(nest),
    }
    if min_size > 1:  # absent when off, so that outputs made before the option stay reusable
        header["min_size"] = int(min_size)
    if masks is not None:  # likewise; 0 outside the mask, the clusters 1..k inside
        header["mask"] = "0 outside, clusters 1..k inside"
    fit = "centroids" if centroids is not None else fit_on
    params: dict[str, Any] = {"seed": seed, "n_init": n_init, "fit_samples": fit_samples}
    if select != "inertia":  # absent for the default, so that outputs made before stay reusable
        params["select"] = select
    if fit == "pooled":
        # the fit depends on the set of volumes it drew from (and how many per volume): a
        # run on other inputs redoes every volume
        params["pooled_cases"] = sorted(case_name(p) for p in paths)
    fixed: dict[int, np.ndarray] | None = None
    if centroids is not None:
        fixed = load_centroids(
            centroids,
            ks,
            features,
            header["geometry"],
            dim=int(model.model.cfg.latent_dim) if model is not None else 1,
            curvature=header["curvature"],
            model_content_sha256=header["model_content_sha256"],
            patch_size=header["patch_size"],
        )
    if not dry_run:
        check_output_folder(out, what="cluster -o")
        remove_stale_temporaries(out, recursive=recursive)
    cache_root = resolve_cache_dir(cache_dir) if model is not None else None
    config = {
        "inputs": [str(i) for i in inputs],
        "output": str(out),
        "ks": ks,
        "model": str(model_path) if model_path else None,
        "features": features,
        "fit_on": fit_on,
        "centroids": str(centroids) if centroids is not None else None,
        "patch_size": patch_size,
        "stride": stride,
        "tile": tile if tile is not None else DEFAULT_TILE,
        "n_init": n_init,
        "select": select,
        "fit_samples": fit_samples,
        "metric": metric,
        "smooth": smooth,
        "snap": snap,
        "mrf": mrf,
        "nest": nest,
        "min_size": min_size,
        "mask": str(mask) if mask is not None else None,
        "seed": seed,
        "device": device,
        "threads": threads,
        "torch_threads": _torch_threads(),
        "cache_dir": str(cache_root) if cache_root else None,
        "preview": preview,
        "recursive": recursive,
        "skip_existing": skip_existing,
        "num_parts": num_parts,
        "part_id": part_id,
    }
    done = {
        path: skip_existing
        and _case_done(
            out,
            path,
            ks,
            preview=preview,
            header=header,
            fit=fit,
            params=params,
            fixed=fixed,
            nest=nest,
            mask=masks.paths[path] if masks else None,
        )
        for path in selected
    }
    if fit == "pooled" and not all(done.values()):
        # the centroids are fitted again on all inputs: every volume's labels must use them
        done = dict.fromkeys(done, False)
    if dry_run:
        return plan(
            "cluster",
            selected,
            part,
            model=model,
            done=done,
            cache=_existing_cache(cache_root, optional=True) if cache_root else None,
            reuse_cache=True,
            patch_size=patch_size,
            stride=stride,
            tile=tile,
            ks=ks,
            n_init=n_init,
            select=clusterer.select,
            fit_samples=fit_samples,
            pooled_fit=fit == "pooled" and not all(done.values()),
            smooth=smooth,
            snap=snap,
            mrf=mrf,
            nest=nest,
            min_size=min_size,
            total_inputs=len(paths),
            config=config,
            clusterer=clusterer if fit == "volume" else None,
            masks=masks,
            euclidean=clusterer.kind != "ball",
        )
    # (optional: a cache that cannot be written, or fills up, costs only the caching)
    cache = EmbeddingCache(cache_root, optional=True) if cache_root is not None else None

    def features_of(volume: Any, sha: str) -> tuple[np.ndarray, bool]:
        if model is None:
            return _intensity_features(volume.data, str(volume.path)), False
        return embed_one(
            volume,
            model,
            cache,
            patch_size=patch_size,
            stride=stride,
            tile=tile,
            progress=progress,
            volume_sha256=sha,
        )

    def fitted(
        flat: np.ndarray,
        k: int,
        volume: Any,
        sha: str,
        rows: np.ndarray | None = None,
        nest_spec: dict[str, Any] | None = None,
        mask_sha256: str | None = None,
    ) -> np.ndarray:
        """This volume's k-means centroids: from the cache (embedding features) or fitted.

        ``rows``: fit on these rows only (a nested fit, described by ``nest_spec``,
        and/or the voxels inside a mask, ``mask_sha256``).
        """
        if cache is None or model is None:
            return clusterer.fit(flat, k, rows)
        key = _centroids_key(sha, model, patch_size, stride, k, clusterer, nest_spec, mask_sha256)
        hit = cache.get(key)
        if hit is not None and hit.shape == (k, flat.shape[1]) and hit.dtype == np.float64:
            return np.array(hit)
        centers = clusterer.fit(flat, k, rows)
        cache.put(
            key,
            centers,
            {
                "kind": "centroids",
                "k": k,
                "volume": os.path.abspath(volume.path),
                "model": os.path.abspath(model.path),
                "seed": seed,
                "n_init": n_init,
                "fit_samples": fit_samples,
                "select": select,
            },
        )
        return centers

    failures = Failures(len(selected))
    failed: dict[Path, str] = {}
    rows: list[dict[str, Any]] = []
    computed = 0
    with RunRecorder(out, "cluster", config, part, argv, environ, failures=failures) as run:
        run.set(
            device=str(model.device) if model else "cpu",
            seed=seed,
            model=str(model_path) if model_path else None,
            model_sha256=model.sha256 if model else None,
        )
        todo = [p for p in selected if not done[p]]
        if fit == "pooled" and todo:
            # All inputs (this is the only part), also those already done: the
            # same inputs give the same centroids, so earlier outputs stay valid.
            per_volume = max(1, fit_samples // len(selected))
            rng = np.random.default_rng(seed)
            samples = []
            for i, path in enumerate(selected):
                try:
                    volume = read_volume(path)
                    feats, cached = features_of(volume, array_sha256(volume.data))
                    computed += int(model is not None and not cached)
                    flat = np.asarray(feats).reshape(-1, feats.shape[-1])
                    pool = (
                        np.arange(len(flat))
                        if masks is None
                        else np.flatnonzero(masks.read(path, volume)[0].reshape(-1))
                    )
                    take = rng.choice(len(pool), min(per_volume, len(pool)), replace=False)
                    samples.append(np.asarray(flat[pool[np.sort(take)]], dtype=np.float64))
                except Exception as exc:  # noqa: BLE001 - reported, the others go on
                    failed[path] = failures.record(path, exc).message
                progress("pooled features", i + 1, len(selected))
            if samples:
                pooled = np.concatenate(samples)
                fixed = {}
                for k in ks:
                    if len(pooled) < k:
                        raise BadInputError(
                            f"--fit-on pooled: {len(pooled)} voxels sampled from "
                            f"{len(samples)} volume(s) ({per_volume} per volume, --fit-samples "
                            f"{fit_samples} over {len(selected)}, fewer where a volume or mask "
                            f"is smaller), fewer than k={k}"
                        )
                    fixed[k] = clusterer.fit(pooled, k)
        try:
            for i, path in enumerate(selected):
                watch = Stopwatch()
                sha: str | None = None
                row: dict[str, Any] = {"volume": str(path), "outputs": [], "cached": False}
                if done[path]:
                    row.update(
                        status="skipped",
                        outputs=[str(f) for f in _case_outputs(out, path, ks, False)[:-1]],
                    )
                    record = _read_json(_case_centroids_path(out, case_name(path)))
                    with contextlib.suppress(KeyError, TypeError):
                        sha = record["source"]["sha256"]  # checked by _case_done: this input's
                elif path in failed:
                    row.update(status="failed", error=failed[path])
                else:
                    try:
                        stamp = _source_stamp(path)
                        volume = read_volume(path)
                        sha = array_sha256(volume.data)
                        source = _source_record(stamp, sha, volume)
                        inside: np.ndarray | None = None
                        off_mask: np.ndarray | None = None
                        mask_sha: str | None = None
                        inside_rows: np.ndarray | None = None
                        if masks is not None:
                            inside, source["mask"] = masks.read(path, volume)
                            off_mask = ~inside
                            mask_sha = source["mask"]["inside_sha256"]
                            inside_rows = np.flatnonzero(inside.reshape(-1))
                        watch.lap("read")
                        feats, cached = features_of(volume, sha)
                        computed += int(model is not None and not cached)
                        row["cached"] = bool(cached)
                        watch.lap("embed")
                        flat = np.asarray(feats).reshape(-1, feats.shape[-1])
                        # the scaled image for --snap and --mrf: intensity features are exactly that
                        scaled = None if model is not None else np.asarray(feats)[..., 0]
                        noise: float | None = None  # its noise, once per volume
                        usable = len(flat) if inside_rows is None else len(inside_rows)
                        if fixed is None and usable < max(ks):  # before any output is replaced
                            where = "" if inside_rows is None else " inside the mask"
                            raise BadInputError(
                                f"{path}: {usable} voxel(s){where}, fewer than --k {max(ks)}"
                            )
                        sets = []
                        old_record: Any = None
                        taken = False  # the old record: taken before an output is replaced
                        # --nest: the smallest k's final labels and the band around their boundaries
                        coarse: np.ndarray | None = None
                        band: np.ndarray | None = None
                        outside: np.ndarray | None = None  # flat indices of the voxels off the band
                        # where fill_band takes each band voxel's label from (nesting.band_sources)
                        sources: tuple[np.ndarray, np.ndarray] | None = None
                        not_nested: str | None = None  # why this volume's larger k are not nested
                        levels: tuple[float, float] | None = None  # the previews' grey levels
                        for k in ks:
                            spec = _nest_spec(k, ks, nest, smooth, snap, mrf)
                            if spec is not None and band is None:
                                assert coarse is not None  # the smallest k comes first
                                band = band_mask(coarse, nest, inside)
                                bare = bare_labels(coarse, band, inside)
                                if bare:  # a fit without them would label them by the others
                                    shown = [b + (inside is not None) for b in bare]  # as written
                                    not_nested = (
                                        f"label(s) {', '.join(map(str, shown))} of k={min(ks)} "
                                        f"lie wholly within {nest:g} voxel(s) of another label"
                                    )
                                    log.info(
                                        "%s: the larger k are not nested (--nest): %s",
                                        path,
                                        not_nested,
                                    )
                                if off_mask is not None:  # outside: a region of its own, not filled
                                    # (in int64: k = 256 labels 0..255, and 255 + 1 wrapped
                                    # to 0 in uint8, putting the outside into region 0)
                                    coarse = np.where(
                                        off_mask, int(coarse.max()) + 1, coarse.astype(np.int64)
                                    )
                                outside = np.flatnonzero(~band.reshape(-1))
                                if inside_rows is not None:
                                    outside = np.intersect1d(
                                        outside, inside_rows, assume_unique=True
                                    )
                                watch.lap("cluster")
                            nested = spec is not None and not_nested is None
                            if nested and fixed is None and len(outside) < k:
                                nested = False  # (nearly) all band: a plain fit, no nesting
                                not_nested = f"fewer than {k} voxels lie off the band"
                                log.info("%s: k=%d is not nested (--nest): %s", path, k, not_nested)
                            if fixed is not None:
                                centers = fixed[k]
                            else:
                                # (the cache key keeps the spec: the same inputs and options
                                # drop the nesting again, and a dry run finds the fit by it)
                                fit_rows = outside if nested else inside_rows
                                with warnings.catch_warnings(record=True) as caught:
                                    warnings.simplefilter("always")
                                    centers = fitted(flat, k, volume, sha, fit_rows, spec, mask_sha)
                                for message in dict.fromkeys(
                                    " ".join(str(w.message).split()) for w in caught
                                ):  # k-means' own warnings, with the volume and k they are about
                                    log.warning("%s: k=%d: %s", path, k, message)
                            sets.append(
                                {
                                    "k": k,
                                    "nested_in": _nested_in(k, ks, nest),
                                    "centers": centers.tolist(),
                                    # (only where nesting was asked for but not done)
                                    **(
                                        {"not_nested": not_nested}
                                        if spec is not None and not nested
                                        else {}
                                    ),
                                }
                            )
                            labels = clusterer.labels(
                                np.asarray(feats).reshape(*volume.data.shape, -1),
                                centers,
                                smooth,
                                inside,
                            )
                            if nested:
                                assert coarse is not None and band is not None
                                if sources is None:  # the same for every nested k
                                    sources = band_sources(coarse, band)
                                labels = fill_band(labels, coarse, band, sources)
                                if k == ks[-1]:  # no later k takes labels from it
                                    sources = None
                            if (snap > 0 or mrf > 0) and noise is None:  # once per volume
                                if scaled is None:
                                    scaled = _edge_image(volume.data, path)
                                noise = noise_std(scaled, None if off_mask is None else ~off_mask)
                            if snap > 0:
                                labels = snap_labels(
                                    labels, scaled, sigma=snap, outside=off_mask, noise=noise
                                )
                            if mrf > 0:
                                labels = refine_labels(
                                    labels,
                                    scaled,
                                    beta=mrf,
                                    device=clusterer.device,
                                    outside=off_mask,
                                    noise=noise,
                                )
                            if coarse is None and nest > 0 and len(ks) > 1:
                                coarse = labels
                            if min_size > 1:
                                with warnings.catch_warnings(record=True) as caught:
                                    warnings.simplefilter("always")
                                    labels = remove_small_components(labels, min_size, off_mask)
                                for w in caught:
                                    log.warning("%s: k=%d: %s", path, k, w.message)
                            if inside is not None:  # 0 outside, the clusters 1..k inside
                                found = int(np.unique(labels[inside]).size)
                                labels = np.where(inside, labels.astype(np.int64) + 1, 0).astype(
                                    np.min_scalar_type(k)
                                )
                            else:
                                found = int(
                                    np.count_nonzero(np.bincount(labels.ravel(), minlength=k))
                                )
                            row.setdefault("labels_found", {})[str(k)] = found
                            if found < k:
                                steps_on = [  # the steps that ran on this k's labels
                                    f"--{name} 0"
                                    for name, on in (
                                        ("smooth", smooth > 0),
                                        ("snap", snap > 0),
                                        ("mrf", mrf > 0),
                                        ("nest", nested),
                                        ("min-size", min_size > 1),
                                    )
                                    if on
                                ]
                                log.warning(
                                    "%s: k=%d: the output has %d distinct label(s), not %d (%s)",
                                    path,
                                    k,
                                    found,
                                    k,
                                    "the fit found fewer distinct clusters, or the spatial steps "
                                    f"absorbed small ones; {' '.join(steps_on)} shows the plain "
                                    "k-means labels"
                                    if steps_on
                                    else "the fit found fewer distinct clusters",
                                )
                            watch.lap("cluster")
                            target = out / f"{volume.name}_k{k}{volume.geometry.suffix}"
                            if not taken:
                                old_record, taken = _take_case_record(out, volume.name, ks), True
                            write_labels(target, labels, volume.geometry)
                            row["outputs"].append(str(target))
                            _remove_replaced_format(target, old_record, k)
                            # sizes of what was written: _case_done finds a cut or lost file
                            sets[-1]["bytes"] = _file_size(target)
                            if preview:
                                levels = levels or window_levels(volume.data)  # (once a volume)
                                png = out / f"{volume.name}_k{k}.png"
                                write_preview(
                                    png,
                                    volume.data,
                                    labels,
                                    volume.geometry.spacing,
                                    outside=off_mask is not None,
                                    levels=levels,
                                )
                                sets[-1]["preview_bytes"] = _file_size(png)
                            else:  # a preview of the labels this replaced would show others
                                stale = out / f"{volume.name}_k{k}.png"
                                if stale.is_file():
                                    stale.unlink()
                                    log.info("%s: removed, it showed the labels replaced", stale)
                            watch.lap("write")
                        _write_case_centroids(
                            out,
                            volume,
                            header=header,
                            fit=fit,
                            params=params,
                            sets=sets,
                            source=source,
                            old=old_record,
                        )
                        watch.lap("write")
                        row["status"] = "done"
                    except Exception as exc:  # noqa: BLE001 - reported, the others go on
                        row.update(status="failed", error=failures.record(path, exc).message)
                row["seconds"] = watch.total
                row["stages"] = dict(watch.seconds)
                rows.append(row)
                run.add(
                    path,
                    status=row["status"],
                    sha256=sha,
                    seconds=watch.seconds,
                    cached=row["cached"],
                    outputs=row["outputs"],
                    error=row.get("error"),
                )
                if row["status"] != "failed" or failures.total > 1:
                    progress("cluster", i + 1, len(selected))
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: finished cases stay listed
            with contextlib.suppress(Exception), signals_held() as caught:
                _merge_centroids(out, header)  # (a signal meanwhile waits for it, dropped)
                caught.clear()
            raise
        error: HypsegError | None = None
        with signals_held():  # a signal meanwhile waits for the file, then stops the run
            try:
                merged: Path | None = _merge_centroids(out, header)
            except HypsegError as exc:  # (a full disk): the summary still goes out, then this
                merged, error = None, exc
        run.exit_status = failures.exit_code if error is None else error.exit_code
        if error is not None:
            run.set(error=str(error))
    return {
        **({"error": str(error), "error_exit_code": error.exit_code} if error else {}),
        "out": str(out),
        "ks": ks,
        "features": features,
        "fit_on": fit,
        "computed": computed,
        "done": sum(r["status"] == "done" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": len(failures),
        "part": part.to_dict(),
        "centroids": str(merged) if merged else None,
        "volumes": rows,
        "failures": failures.to_json(),
        "manifest": str(run.path),
    }
