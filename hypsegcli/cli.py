"""The ``hypseg`` command line (Typer). Commands are thin: parse, call the pipeline, render.

Only this module imports typer and rich. Heavy modules (torch, nibabel...) are
imported inside the commands, so ``hypseg --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from . import __version__
from .errors import (
    BadInputError,
    HypsegError,
    Terminated,
    interrupt_status,
    is_out_of_memory,
    note_termination,
    reset_terminations,
    termination_pending,
)

F = TypeVar("F", bound=Callable[..., Any])

stderr = Console(stderr=True, highlight=False)
log = logging.getLogger("hypsegcli")


class _State:
    debug = False
    quiet = False
    #: the command line as given to main() (recorded in run manifests)
    argv: list[str] | None = None
    #: a command's body is running (handle_errors): SIGTERM raises Terminated there only,
    #: not while typer parses the command line (which turns any KeyboardInterrupt into 130)
    in_command = False


state = _State()

app = typer.Typer(
    name="hypseg",
    help=(
        "Unsupervised segmentation of 3D biomedical volumes (NIfTI MRI, MRC cryo-ET) with "
        "hyperbolic VAEs. Results go to stdout only with --json (and for --version, cache path "
        "and cache ls); progress and logs go to stderr."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class VolumeFormat(str, Enum):
    nifti = "nifti"
    mrc = "mrc"


# ----------------------------------------------------------------------------- plumbing


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        stderr.print(
            f"{prefix}{record.getMessage()}", markup=False, highlight=False, soft_wrap=True
        )


def _setup_logging() -> None:
    root = logging.getLogger("hypsegcli")
    root.handlers[:] = [_StderrHandler()]
    root.propagate = False
    root.setLevel(
        logging.DEBUG if state.debug else logging.WARNING if state.quiet else logging.INFO
    )


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the CLI: one line through hypseg's logger (the source
    location only with --debug)."""
    text = " ".join(str(message).split())
    where = f" ({filename}:{lineno})" if state.debug else ""
    logging.getLogger("hypsegcli").warning("%s: %s%s", category.__name__, text, where)


def _file_name(text: str) -> Path:
    """The value of an option naming a file to write: one ending in a separator (or in
    ``.`` or ``..``) names a folder, which Path would quietly turn into a file name
    (``--csv new/`` wrote a file ``new``)."""
    if os.path.basename(text) in ("", ".", ".."):
        raise typer.BadParameter(f"{text!r} names a folder; a file name is needed")
    return Path(text)


def _fail(message: str, code: int) -> typer.Exit:
    stderr.print(f"hypseg: error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def runtime_message(exc: BaseException) -> str:
    """One line for an unexpected exception: out-of-memory and file-system errors in words,
    anything else as its type and the first line of its message."""
    text = " ".join(str(exc).split())
    if is_out_of_memory(exc):
        detail = f" ({text[:160]})" if text else ""
        return (
            f"out of memory{detail}; try a smaller --batch-size, --patch-size or --tile, "
            "or fewer --threads"
        )
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first} (run with --debug for a traceback)"


# the config fields that train's options of the same name (``--r-min`` for ``r_min``) set:
# the configs' own errors name the fields, as the Python API spells them
_FIELDS_OF_OPTIONS = (
    "patch_size",
    "latent_dim",
    "curvature",
    "gyroplane_init",
    "beta",
    "margin",
    "mc_samples",
    "texture_weight",
    "r_min",
    "r_max",
    "negative_gap",
    "steps",
    "max_minutes",
    "batch_size",
    "lr",
    "checkpoint_every",
    "grad_clip",
)


@contextlib.contextmanager
def _config_errors_name_options(arch: str) -> Iterator[None]:
    """Re-raise a config's error with the command line's option names for its fields."""
    try:
        yield
    except BadInputError as exc:
        message = re.sub(
            r"\b(" + "|".join(_FIELDS_OF_OPTIONS) + r")=",
            lambda m: "--" + m[1].replace("_", "-") + " ",
            str(exc),
        )
        message = re.sub(r"kernels=\(.*?\) and paddings=\(.*?\)", f"--arch {arch}", message)
        raise BadInputError(message) from None


#: Exit status of a command whose stdout reader left (a shell's for a SIGPIPE death)
SIGPIPE_STATUS = 128 + 13


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is left for
    a reader that left does not print "Exception ignored ... BrokenPipeError"."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def handle_errors(func: F) -> F:
    """Turn domain errors into one-line messages and exit codes (tracebacks only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .io import forget_header_notes

        _setup_logging()
        forget_header_notes()  # (each command is a run of its own, in-process too)
        shown = warnings.showwarning
        warnings.showwarning = _show_warning  # libraries' warnings: one line on stderr too
        try:
            state.in_command = True
            if termination_pending():  # SIGTERM while the command line was parsed
                raise Terminated()
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:
            # the reader of stdout left (`hypseg cache ls | head -1`): stop without a word,
            # with the status of a process that SIGPIPE stops (128 + 13), as `ls` would
            if state.debug:
                raise
            _quiet_stdout()
            raise typer.Exit(SIGPIPE_STATUS) from None
        except HypsegError as exc:
            if state.debug:
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM (see main)
            if state.debug:
                raise
            code, message = interrupt_status(exc)
            raise _fail(message, code) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if state.debug:
                raise
            raise _fail(runtime_message(exc), 1) from None
        finally:
            state.in_command = False
            warnings.showwarning = shown

    return wrapper  # type: ignore[return-value]


def emit_json(payload: Any) -> None:
    """Write a JSON result on stdout (the only thing hypseg ever writes there)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def _finish_batch(summary: dict[str, Any], as_json: bool, *, total: int, what: str) -> None:
    """Print the --json summary, then fail with a one-line summary if any item failed.

    Exit code 2 when every failure was bad input, else 1.
    """
    from .batch import exit_code_of, failure_summary

    if as_json:
        emit_json(summary)
    if summary.get("error"):  # the run failed at its end (e.g. writing its merged record)
        raise _fail(str(summary["error"]), int(summary.get("error_exit_code", 1)))
    failures = summary.get("failures") or []
    if failures:
        raise _fail(failure_summary(failures, total, what), exit_code_of(failures))


NUM_PARTS_HELP = (
    "Process only one part of the inputs: the sorted inputs are dealt round-robin into N parts "
    "(input i goes to part i mod N). Default: from a Slurm job array (SLURM_ARRAY_TASK_COUNT) "
    "when SLURM_ARRAY_TASK_ID is set; --num-parts 1 processes all inputs."
)
EVAL_NUM_PARTS_HELP = (
    "Score only one part of the prediction/truth pairs: the pairs, sorted by prediction path, "
    "are dealt round-robin into N parts (pair i goes to part i mod N). Default: from a Slurm "
    "job array (SLURM_ARRAY_TASK_COUNT) when SLURM_ARRAY_TASK_ID is set; --num-parts 1 scores "
    "all pairs."
)
PART_ID_HELP = (
    "Which part to process, 0-based (0 to N-1). Default: SLURM_ARRAY_TASK_ID minus "
    "SLURM_ARRAY_TASK_MIN (divided by SLURM_ARRAY_TASK_STEP)."
)
DRY_RUN_HELP = (
    "Print the plan (volumes, shapes, voxels, which are done or cached, estimated time and "
    "peak memory) and stop; nothing is computed or written."
)
# Options shared by the batch commands (embed, cluster; evaluate takes PartIdOption).
NumPartsOption = Annotated[int | None, typer.Option("--num-parts", min=1, help=NUM_PARTS_HELP)]
PartIdOption = Annotated[int | None, typer.Option("--part-id", min=0, help=PART_ID_HELP)]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)]
PlanJsonOption = Annotated[
    bool, typer.Option("--json", help="Print a JSON summary (or the --dry-run plan) on stdout.")
]


def _finish_plan(plan: dict[str, Any], as_json: bool) -> None:
    """Show the --dry-run plan (and its JSON), then fail where a volume cannot be run: each
    one's error on a line of its own, exit 2 when every one was bad input, else 1 (a
    ``--dry-run && sbatch ...`` gate must not pass)."""
    _render_plan(plan)
    if as_json:
        emit_json(plan)
    errors = [row for row in plan["volumes"] if row["state"] == "error"]
    for row in errors:
        log.error("%s", row["error"])
    if errors:
        raise _fail(
            f"dry run: {len(errors)} of {len(plan['volumes'])} volume(s) could not be planned",
            2 if all(row.get("bad_input") for row in errors) else 1,
        )


def _render_plan(plan: dict[str, Any]) -> None:
    """The --dry-run plan as a table on stderr."""
    if state.quiet:
        return
    from rich.table import Table

    def size(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e9:.2f} GB"

    def duration(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"

    table = Table(title=f"hypseg {plan['command']} --dry-run", title_justify="left")
    # names fold rather than end in "..." (tomograms' names differ at their ends), and take
    # the width the other columns leave
    table.add_column("volume", overflow="fold", ratio=1)
    for column in ("shape", "voxels", "state", "est. time", "est. peak memory"):
        table.add_column(column, no_wrap=True)
    for row in plan["volumes"]:
        table.add_row(
            Path(row["volume"]).name,
            "x".join(map(str, row["shape"])) if row.get("shape") else "-",
            f"{row['voxels']:,}" if row.get("voxels") else "-",
            row["state"],  # (errors are printed below the table)
            duration(row.get("seconds")),
            size(row.get("peak_bytes")),
        )
    stderr.print(table)
    part = plan["part"]
    share = f"part {part['part_id']} of {part['num_parts']}: " if part["num_parts"] > 1 else ""
    counts = ", ".join(f"{n} {state}" for state, n in plan["counts"].items() if n)
    stderr.print(
        f"{share}{len(plan['volumes'])} of {plan['inputs']} volume(s) ({counts or 'none'}); "
        f"estimated {duration(plan['estimated_seconds'])} and at most "
        f"{size(plan['estimated_peak_bytes'])} on {plan['device']} "
        f"(measured matmul rate {plan['flop_rate'] / 1e9:.0f} GFLOP/s, {plan['threads']} thread(s))",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    stderr.print(f"note: {plan['notes']}", markup=False, highlight=False, soft_wrap=True)


class RichProgress:
    """Progress callback for the pipeline: ``progress(stage, done, total, **info)`` on stderr."""

    #: without a terminal (batch jobs, log files), a plain line per stage at most this often
    LOG_INTERVAL_S = 30.0

    def __init__(self) -> None:
        import time

        self._clock = time.monotonic
        self._plain = not stderr.is_terminal
        self._last_line: dict[str, float] = {}
        self._started: dict[str, float] = {}
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=stderr,
            transient=False,
            disable=state.quiet,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tasks:
            self._progress.stop()

    def _plain_line(self, stage: str, done: int, total: int, text: str) -> None:
        """One log line per stage at start, every LOG_INTERVAL_S seconds and at the end."""
        if state.quiet:
            return
        now = self._clock()
        first = stage not in self._started
        if first:
            self._started[stage] = now
        finished = total > 0 and done >= total
        if not (first or finished or now - self._last_line.get(stage, now) >= self.LOG_INTERVAL_S):
            return
        self._last_line[stage] = now
        elapsed = int(now - self._started[stage])
        share = f" ({100.0 * done / total:.0f}%)" if total > 0 else ""
        count = f"{done}/{total}" if total > 0 else f"{done}"
        line = f"{stage}: {count}{share}, {elapsed // 60}:{elapsed % 60:02d} elapsed"
        stderr.print(f"{line}  {text}".rstrip(), markup=False, highlight=False, soft_wrap=True)

    def __call__(self, stage: str, done: int, total: int, **info: Any) -> None:
        text = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
        )
        if self._plain:
            self._plain_line(stage, done, total, text)
            return
        if not self._tasks:
            self._progress.start()
        bar_total = total if total > 0 else None  # unknown total: an indeterminate bar
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=bar_total, info=text)
        self._progress.update(self._tasks[stage], completed=done, total=bar_total, info=text)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hypseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr, no progress.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    state.quiet = quiet
    state.debug = debug


# ----------------------------------------------------------------------------- synth


@app.command()
@handle_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created if missing).")],
    n: Annotated[int, typer.Option("--n", min=1, max=1_000_000, help="Number of volumes.")] = 20,
    size: Annotated[
        int,
        typer.Option("--size", min=16, max=1024, help="Side of each cubic volume in voxels."),
    ] = 50,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Random seed: the same seed gives the same bytes.")
    ] = 0,
    irregular: Annotated[
        bool,
        typer.Option(
            "--irregular", help="Perturbed, non-convex boundaries (the paper's harder variant)."
        ),
    ] = False,
    fmt: Annotated[
        VolumeFormat, typer.Option("--format", help="File format of the volumes.")
    ] = VolumeFormat.nifti,
    split: Annotated[
        str | None,
        typer.Option(
            "--split", help="Split into train/val/test folders in these proportions, e.g. 80/20/20."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout.")
    ] = False,
) -> None:
    """Generate hierarchical synthetic volumes with 3-level ground truth.

    Writes OUT/images/<case>, OUT/labels/<case>_L1, _L2, _L3 and OUT/dataset.json
    (with --split: OUT/train/..., OUT/val/..., OUT/test/...). A folder
    holding another dataset (other cases, seed, size, variant or format) is
    refused; the same command again rewrites the same files.
    """
    from . import pipeline

    with RichProgress() as progress:
        summary = pipeline.synth(
            out,
            n=n,
            size=size,
            seed=seed,
            irregular=irregular,
            fmt=fmt.value,
            split=pipeline.parse_split(split) if split else None,
            progress=progress,
        )
    log.info("wrote %d volume(s) to %s", summary["n"], out)
    if as_json:
        emit_json(summary)


# ----------------------------------------------------------------------------- train


class Geometry(str, Enum):
    hyperbolic = "hyperbolic"
    euclidean = "euclidean"


class ScaleSampling(str, Enum):
    uniform = "uniform"
    log = "log"


class Norm(str, Enum):
    percentile = "percentile"
    zscore = "zscore"
    none = "none"


class Likelihood(str, Enum):
    unit = "unit"
    learned = "learned"


class Arch(str, Enum):
    valid = "valid"
    paper = "paper"


ARCHITECTURES = {
    # name: (kernels, paddings)
    "valid": ((3, 3, 3, 3), (0, 0, 0, 0)),
    "paper": ((5, 5, 5, 5), (2, 1, 1, 0)),
}

DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."
#: Default ``cluster --smooth`` (Potts beta), chosen on the validation split (CHANGELOG).
SMOOTH_DEFAULT = 0.8
#: Default ``cluster --snap`` (Gaussian sigma in voxels), chosen on the validation split (CHANGELOG).
SNAP_DEFAULT = 2.0
#: Default ``cluster --mrf`` (Potts weight of the intensity MRF), chosen on the validation split (CHANGELOG).
MRF_DEFAULT = 0.5
#: Default ``cluster --nest`` (band width in voxels), chosen on the validation split (CHANGELOG).
NEST_DEFAULT = 4.0
#: Default ``cluster --min-size`` (voxels; 0: off). On the validation split 50 gained
#: +0.0005 / +0.0023 / +0.0005 (3 seeds); not the default until the benchmark has been
#: rerun with it (CHANGELOG).
MIN_SIZE_DEFAULT = 0
#: Default ``cluster --n-init`` (k-means restarts), chosen on the validation split with
#: ``--select silhouette`` (CHANGELOG).
N_INIT_DEFAULT = 8


@app.command()
@handle_errors
def train(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path], typer.Argument(help="Training volumes: files, folders or glob patterns.")
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Model file to write (also <stem>.ckpt.pt and <stem>.history.csv beside it).",
            parser=_file_name,
            metavar="PATH",
        ),
    ],
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="Optimisation steps (default 3000 unless --max-minutes is given).",
        ),
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            "--max-minutes",
            help="Stop after this many minutes of training (checked after each step: at least one step runs).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            max=1 << 16,
            help="Triplets per step (per process under torchrun); default 64, or with --resume "
            "the checkpoint's (a value given here applies from the checkpoint on).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Learning rate (Riemannian Adam, amsgrad); default 1e-3, or with --resume the "
            "checkpoint's (a value given here applies from the checkpoint on).",
        ),
    ] = None,
    grad_clip: Annotated[
        float | None,
        typer.Option(
            "--grad-clip",
            min=0,
            help="Clip the gradients' total norm to this before each update; default 0 (off), "
            "or with --resume the checkpoint's (10 for checkpoints written before this "
            "option). On the default loss the norms are in the hundreds to thousands, so a "
            "clip such as 10 rescales every update.",
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", min=0, max=2**63 - 1, help="Seed for initialisation, sampling and noise."
        ),
    ] = 0,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, max=4096, help="CPU threads for torch (default: torch's choice)."
        ),
    ] = None,
    geometry: Annotated[
        Geometry, typer.Option("--geometry", help="Latent space.")
    ] = Geometry.hyperbolic,
    gyroconv: Annotated[
        bool | None,
        typer.Option(
            "--gyroconv/--no-gyroconv",
            help="Gyroplane convolution as the decoder's first layer (a hyperbolic layer: default on with --geometry hyperbolic, off with euclidean).",
            show_default=False,
        ),
    ] = None,
    triplet: Annotated[
        bool, typer.Option("--triplet/--no-triplet", help="Add the hierarchical triplet loss.")
    ] = True,
    arch: Annotated[
        Arch,
        typer.Option(
            "--arch",
            help="Encoder layout: 'valid' (4 unpadded k3 convs; dense inference is exact) or 'paper' (the authors' padded k5 convs).",
        ),
    ] = Arch.valid,
    patch_size: Annotated[
        int,
        typer.Option(
            "--patch-size",
            max=256,
            help="Encoder input side m (patches are resampled to m^3); at least 9 with either --arch.",
        ),
    ] = 10,
    latent_dim: Annotated[
        int, typer.Option("--latent-dim", min=1, max=1024, help="Latent dimension d.")
    ] = 2,
    curvature: Annotated[
        float, typer.Option("--curvature", help="Ball curvature c (the ball has curvature -c).")
    ] = 1.0,
    gyroplane_init: Annotated[
        float,
        typer.Option(
            "--gyroplane-init",
            min=0,
            help="Standard deviation (per coordinate, tangent space, units of 1/sqrt(c)) of the gyroplane layer's initial offsets p (with --gyroconv): 0.05 starts them near the origin, where the layer acts like a linear layer on log_0(z); 0.5 spreads them over the ball (scored lower on validation data).",
        ),
    ] = 0.05,
    beta: Annotated[
        float,
        typer.Option(
            "--beta",
            help="Weight of the triplet loss against the per-patch ELBO (8 is the authors' beta = 1000 on an ELBO summed over batches of 128; 2 scored higher on validation data with cluster's spatial steps).",
        ),
    ] = 2.0,
    margin: Annotated[float, typer.Option("--margin", help="Triplet margin alpha.")] = 0.2,
    mc_samples: Annotated[
        int,
        typer.Option(
            "--mc-samples", min=1, max=1024, help="Posterior samples K per anchor for the ELBO."
        ),
    ] = 1,
    likelihood: Annotated[
        Likelihood,
        typer.Option(
            "--likelihood",
            help="Voxel likelihood of the VAE: 'unit' (Normal(x_hat, 1), the paper's) or 'learned' (a per-voxel scale decoded from z).",
        ),
    ] = Likelihood.unit,
    texture_weight: Annotated[
        float,
        typer.Option(
            "--texture-weight",
            min=0,
            help="Weight w of a texture term: a small head predicts each anchor's log standard deviation from z, scored 0.5 w (error)^2, so that the latent must encode local texture energy; 0 turns it off (the paper).",
        ),
    ] = 700.0,
    scale_sampling: Annotated[
        ScaleSampling,
        typer.Option(
            "--scale-sampling",
            help="Anchor sides drawn log-uniformly (default) or uniformly (the paper's choice for small volumes).",
        ),
    ] = ScaleSampling.log,
    r_min: Annotated[float, typer.Option("--r-min", help="Smallest anchor side (voxels).")] = 5.0,
    r_max: Annotated[float, typer.Option("--r-max", help="Largest anchor side (voxels).")] = 16.0,
    negative_gap: Annotated[
        float | None,
        typer.Option(
            "--negative-gap",
            min=0,
            help="Draw each negative within this many voxels of its anchor's box (neighbouring tissue, harder negatives); default: anywhere in the volume, as the paper.",
        ),
    ] = None,
    norm: Annotated[
        Norm,
        typer.Option(
            "--norm",
            help="Intensity normalisation of every volume, stored in the model file and applied again at inference: 'percentile' (P_low -> 0, P_high -> 1, levels from --norm-range), 'zscore' (zero mean, unit standard deviation, as usual for cryo-ET; values more than four 1-99 percentile ranges beyond those percentiles are clipped first) or 'none' (values as stored, for intensities calibrated across volumes).",
        ),
    ] = Norm.percentile,
    norm_range: Annotated[
        tuple[float, float],
        typer.Option(
            "--norm-range",
            help="Percentiles LOW HIGH mapped to 0 and 1 by --norm percentile (0 100: min-max).",
        ),
    ] = (1.0, 99.0),
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Write a checkpoint every N steps.")
    ] = 100,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from <stem>.ckpt.pt beside --output.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start over where an earlier run left a model or checkpoint at --output "
            "(its model, checkpoint and history are removed before the first step, once the "
            "inputs, their sampling and the model are checked; "
            "without this, or --resume, such a run is refused).",
        ),
    ] = False,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Descend into sub-folders of input folders.")
    ] = False,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="Centre every anchor inside a mask (non-zero voxels): one mask file for every input, or a folder with <case> or <case>_mask per input, as cluster --mask. Positives lie in their anchors; negatives may lie outside the mask (anywhere, or within --negative-gap of the anchor).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout.")
    ] = False,
) -> None:
    """Train the hyperbolic VAE on unlabelled volumes.

    Triplets (anchor, child inside it, disjoint negative) are drawn fresh at
    every step from all volumes. Checkpoints are written atomically every
    --checkpoint-every steps and at the end; --resume continues an
    interrupted run with the checkpoint's model, sampling and normalisation
    settings.
    """
    from . import pipeline
    from .config import ModelConfig, SamplingConfig, TrainConfig

    if gyroconv and geometry is Geometry.euclidean:
        raise BadInputError(
            "--gyroconv needs --geometry hyperbolic (the gyroplane layer works on the "
            "Poincaré ball); drop it or add --no-gyroconv"
        )
    if gyroconv is None:
        gyroconv = geometry is Geometry.hyperbolic
    kernels, paddings = ARCHITECTURES[arch.value]
    norm_low, norm_high = norm_range
    if not 0 <= norm_low < norm_high <= 100:
        raise BadInputError(
            f"--norm-range {norm_low:g} {norm_high:g}: should satisfy 0 <= LOW < HIGH <= 100"
        )
    with _config_errors_name_options(arch.value):
        model_config = ModelConfig(
            patch_size=patch_size,
            kernels=kernels,
            paddings=paddings,
            latent_dim=latent_dim,
            curvature=curvature,
            gyroplane_init=gyroplane_init,
            geometry=geometry.value,
            gyroconv=gyroconv,
            triplet=triplet,
            beta=beta,
            margin=margin,
            mc_samples=mc_samples,
            likelihood=likelihood.value,
            texture_weight=texture_weight,
        )
        sampling_config = SamplingConfig(
            r_min=r_min,
            r_max=r_max,
            scale_sampling=scale_sampling.value,
            negative_gap=negative_gap,
            norm=norm.value,
            norm_low=norm_low,
            norm_high=norm_high,
        )
        train_config = TrainConfig(
            steps=steps if steps is not None or max_minutes is not None else 3000,
            max_minutes=max_minutes,
            batch_size=batch_size if batch_size is not None else 64,
            lr=lr if lr is not None else 1e-3,
            seed=seed,
            checkpoint_every=checkpoint_every,
            grad_clip=grad_clip if grad_clip is not None else 0.0,
        )
    with RichProgress() as progress:
        summary = pipeline.train(
            inputs,
            output,
            model_config=model_config,
            sampling_config=sampling_config,
            train_config=train_config,
            device=device,
            threads=threads,
            resume=resume,
            overwrite=overwrite,
            recursive=recursive,
            mask=mask,
            lr_given=lr is not None,
            batch_size_given=batch_size is not None,
            grad_clip_given=grad_clip is not None,
            asked=_settings_given(ctx),
            progress=progress,
        )
    log.info(
        "wrote %s after %d steps (%.0f s, stopped by %s)",
        summary["model"],
        summary["step"],
        summary["elapsed_seconds"],
        summary["stopped_by"],
    )
    from .distributed import is_main_process

    if as_json and is_main_process():  # under torchrun, one summary: rank 0's
        emit_json(summary)


#: train's options that set a model, sampling or train setting: the settings
#: (configuration keys) each sets, of which a resumed run names those its checkpoint's
#: differ from
_SETTING_OPTIONS: dict[str, tuple[str, ...]] = {
    "arch": ("kernels", "paddings"),
    "geometry": ("geometry", "gyroconv"),
    "norm_range": ("norm_low", "norm_high"),
    **{
        name: (name,)
        for name in (
            "patch_size latent_dim curvature gyroplane_init gyroconv triplet beta margin "
            "mc_samples likelihood texture_weight scale_sampling r_min r_max negative_gap norm "
            "seed"
        ).split()
    },
}


def _settings_given(ctx: typer.Context) -> frozenset[str]:
    """The settings the running command's command line (or environment) gave, not its
    defaults: ``train --resume`` warns only where those differ from the checkpoint's."""
    given: set[str] = set()
    for option, keys in _SETTING_OPTIONS.items():
        source = ctx.get_parameter_source(option)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.update(keys)
    return frozenset(given)


# ----------------------------------------------------------------------------- embed / cluster

CACHE_DIR_HELP = "Embedding cache folder (default: $HYPSEG_CACHE_DIR, else the user cache dir)."


@app.command()
@handle_errors
def embed(
    inputs: Annotated[list[Path], typer.Argument(help="Volumes: files, folders or glob patterns.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model file from `hypseg train`.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=(
                "Also write <case>.npy arrays (X, Y, Z, d float32) to this folder, each with "
                "<case>.json: the volume's geometry and the array's provenance."
            ),
        ),
    ] = None,
    patch_size: Annotated[
        int,
        typer.Option(
            "--patch-size",
            "-p",
            min=1,
            max=1024,
            help="Side p of the patch embedded around each voxel.",
        ),
    ] = 5,
    stride: Annotated[
        int,
        typer.Option(
            "--stride",
            min=1,
            help="Embed every s-th voxel and interpolate in between (tangent space at 0).",
        ),
    ] = 1,
    tile: Annotated[
        int | None,
        typer.Option("--tile", min=4, help="Output voxels per tile side (bounds memory)."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, max=4096, help="CPU threads for torch.")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")
    ] = False,
    skip_existing: Annotated[
        bool | None,
        typer.Option(
            "--skip-existing/--overwrite",
            help=(
                "--skip-existing: skip volumes whose output exists (with -o the <case>.npy file "
                "and its <case>.json, made by this model with these options from the input as it "
                "is now; else the cache entry, verified as it is read). --overwrite: recompute every "
                "embedding, replacing cache entries and .npy files. Default: neither; cached "
                "embeddings are reused and .npy files (re)written."
            ),
        ),
    ] = None,
    num_parts: NumPartsOption = None,
    part_id: PartIdOption = None,
    dry_run: DryRunOption = False,
    as_json: PlanJsonOption = False,
) -> None:
    """Compute per-voxel embeddings (posterior means) into the on-disk cache.

    A volume that fails is reported on stderr and the others are processed;
    the exit code is then 2 if every failure was bad input, else 1. With -o a
    run record is appended to OUT/hypseg-runs.jsonl.
    """
    from . import pipeline

    with RichProgress() as progress:
        summary = pipeline.embed(
            inputs,
            model,
            patch_size=patch_size,
            stride=stride,
            tile=tile,
            device=device,
            threads=threads,
            cache_dir=cache_dir,
            output=output,
            recursive=recursive,
            skip_existing=skip_existing,
            num_parts=num_parts,
            part_id=part_id,
            dry_run=dry_run,
            argv=state.argv,
            progress=progress,
        )
    if dry_run:
        _finish_plan(summary, as_json)
        return
    log.info(
        "%d volume(s) embedded, %d from the cache, %d skipped, %d failed (%s)",
        summary["computed"],
        summary["cached"],
        summary["skipped"],
        summary["failed"],
        summary["cache"],
    )
    _finish_batch(summary, as_json, total=len(summary["volumes"]), what="volume")


class Features(str, Enum):
    embedding = "embedding"
    intensity = "intensity"


class FitOn(str, Enum):
    volume = "volume"
    pooled = "pooled"


class Select(str, Enum):
    inertia = "inertia"
    silhouette = "silhouette"


#: Default ``cluster --select`` (which k-means restart is kept), chosen on the validation
#: split (CHANGELOG).
SELECT_DEFAULT = Select.silhouette


@app.command()
@handle_errors
def cluster(
    inputs: Annotated[list[Path], typer.Argument(help="Volumes: files, folders or glob patterns.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Folder for <case>_k<K> label volumes and centroids.json."
        ),
    ],
    k: Annotated[
        list[int],
        typer.Option(
            "--k", "-k", help="Number of clusters; repeat for several levels (--k 2 --k 4 --k 8)."
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Model file from `hypseg train` (not needed with --features intensity).",
        ),
    ] = None,
    features: Annotated[
        Features,
        typer.Option(
            "--features", help="Cluster the model's embeddings, or raw intensities (the baseline)."
        ),
    ] = Features.embedding,
    fit_on: Annotated[
        FitOn,
        typer.Option(
            "--fit-on",
            help="Fit centroids per volume, or once on all inputs pooled (label numbers agree across volumes).",
        ),
    ] = FitOn.volume,
    centroids: Annotated[
        Path | None,
        typer.Option(
            "--centroids", help="Apply pooled centroids from a centroids.json instead of fitting."
        ),
    ] = None,
    patch_size: Annotated[
        int,
        typer.Option(
            "--patch-size",
            "-p",
            min=1,
            max=1024,
            help="Side p of the patch embedded around each voxel.",
        ),
    ] = 5,
    stride: Annotated[
        int,
        typer.Option("--stride", min=1, help="Embed every s-th voxel and interpolate in between."),
    ] = 1,
    tile: Annotated[
        int | None,
        typer.Option("--tile", min=4, help="Output voxels per tile side (bounds memory)."),
    ] = None,
    n_init: Annotated[
        int,
        typer.Option(
            "--n-init",
            min=1,
            max=1000,
            help="k-means restarts (--select chooses the one kept). Poincaré k-means runs each "
            "on at most 16 384 of the fit voxels and refines the kept one on all of them; "
            "Euclidean k-means (--metric euclidean, intensities) runs each on all of them.",
        ),
    ] = N_INIT_DEFAULT,
    select: Annotated[
        Select,
        typer.Option(
            "--select",
            help="Which of the --n-init restarts is kept: silhouette (the largest mean "
            "silhouette on 2 000 of the voxels its restarts ran on: clusters that lie apart) "
            "or inertia (the least: k-means' own objective, which would rather split a large, "
            "spread-out region, such as a noisy background, than separate small structures).",
        ),
    ] = SELECT_DEFAULT,
    fit_samples: Annotated[
        int,
        typer.Option(
            "--fit-samples", min=2, help="Fit k-means on at most this many voxels, then assign all."
        ),
    ] = 200_000,
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="Distance for k-means and the Potts prior (--smooth): auto (the model's own: Poincaré for a hyperbolic model, else Euclidean), poincare, or euclidean (Euclidean k-means on the ball coordinates of a hyperbolic model).",
        ),
    ] = "auto",
    smooth: Annotated[
        float,
        typer.Option(
            "--smooth",
            min=0,
            help="Potts smoothing of the labels (a spatial prior, like Atropos' MRF): weight beta of agreeing with the 26 neighbours, 10 mean-field updates; 0 turns it off (the plain k-means labels need --smooth 0 --snap 0 --mrf 0 --nest 0).",
        ),
    ] = SMOOTH_DEFAULT,
    snap: Annotated[
        float,
        typer.Option(
            "--snap",
            min=0,
            help="Snap label boundaries to intensity edges: a voxel within 2 of a boundary joins the neighbouring label whose local mean intensity (image smoothed with a Gaussian of this many voxels) it matches, where the two labels differ in mean intensity by more than the noise; 0 turns it off.",
        ),
    ] = SNAP_DEFAULT,
    mrf: Annotated[
        float,
        typer.Option(
            "--mrf",
            min=0,
            help="Intensity MRF at label boundaries, after --snap: voxels touching a label of distinct intensity are re-decided by a Gaussian intensity model per label plus a Potts prior of this weight over the 26 neighbours (10 mean-field updates); labels with no voxel 3^3-deep within 3 voxels (structures under 3 voxels thick) are left alone; 0 turns it off.",
        ),
    ] = MRF_DEFAULT,
    nest: Annotated[
        float,
        typer.Option(
            "--nest",
            min=0,
            help="With several --k, nest the larger k in the smallest k's labels: each larger k's own k-means fit leaves out the voxels within this many voxels of a boundary of those labels (patches there straddle two regions and embed between them), and those voxels take the label of the nearest voxel of their own region outside that band, before --snap and --mrf. A pooled fit or --centroids use every voxel, the band's labels are taken all the same. Away from the band the finer labels are their own k-means'; a volume where a label of the smallest k lies wholly within the band is not nested (as with 0). 0 turns it off.",
        ),
    ] = NEST_DEFAULT,
    min_size: Annotated[
        int,
        typer.Option(
            "--min-size",
            min=0,
            help="Last step: every connected piece (26-connected) of a label with fewer than this many voxels takes the label of the nearest voxel outside such pieces (with --mask, of the voxels around it inside the mask where the nearest one lies across the outside), so specks vanish into what surrounds them; a label made only of such pieces disappears. In voxels, whatever the spacing; 0 turns it off.",
        ),
    ] = MIN_SIZE_DEFAULT,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="Segment only inside a mask (non-zero voxels): one mask file for every input, or a folder with <case>, <case>_mask or (BIDS) the same entities and desc-*_mask per input (same shape as the input; with --recursive its sub-folders too). k-means fits on the voxels inside, the spatial steps see only them, and the output is 0 outside and 1..K inside.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed for subsampling and k-means initialisation.")
    ] = 0,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, max=4096, help="CPU threads for torch.")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
    preview: Annotated[
        bool,
        typer.Option(
            "--preview", help="Also write <case>_k<K>.png: middle slices with the labels overlaid."
        ),
    ] = False,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")
    ] = False,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing/--overwrite",
            help=(
                "Skip volumes whose label volumes for every --k (and --preview images) exist and "
                "whose <case>.centroids.json, written last, shows the same model, options and "
                "fitting, made from the input as it is now (the same file untouched, or else the "
                "same voxels and header), with the label files at their recorded sizes; or redo them. Cached embeddings are used "
                "either way."
            ),
        ),
    ] = True,
    num_parts: NumPartsOption = None,
    part_id: PartIdOption = None,
    dry_run: DryRunOption = False,
    as_json: PlanJsonOption = False,
) -> None:
    """Segment volumes by hyperbolic k-means on per-voxel embeddings, at every --k.

    Embeddings come from the cache when present (see `hypseg embed`), and so
    does each volume's k-means fit made with the same embeddings, k, --seed,
    --n-init, --select and --fit-samples (so changing only --smooth, --snap, --mrf
    or --min-size refits nothing but the fits nested by --nest). Of the --n-init
    restarts the one whose clusters lie most apart is kept (--select). Each voxel goes to its
    nearest centroid, then a Potts prior (--smooth) lets neighbouring voxels
    agree, --nest makes the larger k follow the smallest k's regions near
    their boundaries, --snap moves boundaries onto the image's intensity edges
    and --mrf settles the voxels along them by intensity; --min-size then
    removes specks.
    Labels are numbered 0..K-1 by the centroid's distance from the origin of
    the ball (by its coordinates for intensities, Euclidean models and
    --metric euclidean); with --mask, 1..K inside the mask and 0 outside.
    Each case's centroids go to OUT/<case>.centroids.json and are merged into
    OUT/centroids.json; a run record is appended to OUT/hypseg-runs.jsonl. A
    volume that fails is reported and the others are processed (exit code 2 if
    every failure was bad input, else 1).
    """
    from . import pipeline

    with RichProgress() as progress:
        summary = pipeline.cluster(
            inputs,
            output,
            ks=k,
            model_path=model,
            features=features.value,
            fit_on=fit_on.value,
            centroids=centroids,
            patch_size=patch_size,
            stride=stride,
            tile=tile,
            n_init=n_init,
            select=select.value,
            fit_samples=fit_samples,
            metric=metric,
            smooth=smooth,
            snap=snap,
            mrf=mrf,
            nest=nest,
            min_size=min_size,
            mask=mask,
            seed=seed,
            device=device,
            threads=threads,
            cache_dir=cache_dir,
            preview=preview,
            recursive=recursive,
            skip_existing=skip_existing,
            num_parts=num_parts,
            part_id=part_id,
            dry_run=dry_run,
            argv=state.argv,
            progress=progress,
        )
    if dry_run:
        _finish_plan(summary, as_json)
        return
    log.info(
        "wrote %d segmentation(s) to %s (%d volume(s) done, %d skipped as complete, %d failed)",
        sum(len(v["outputs"]) for v in summary["volumes"] if v["status"] == "done"),
        output,
        summary["done"],
        summary["skipped"],
        summary["failed"],
    )
    _finish_batch(summary, as_json, total=len(summary["volumes"]), what="volume")


# ----------------------------------------------------------------------------- evaluate


@app.command()
@handle_errors
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Predicted label volume, or a folder of them.")],
    truth: Annotated[
        Path,
        typer.Argument(
            help="Ground-truth label volume, or a folder of them (or a dataset folder with labels/)."
        ),
    ],
    level: Annotated[
        int | None,
        typer.Option(
            "--level",
            min=1,
            help="Compare with <case>_L<level> ground truth (default: from dataset.json, the level with K classes).",
        ),
    ] = None,
    hausdorff: Annotated[
        bool,
        typer.Option(
            "--hausdorff/--no-hausdorff", help="Compute Hausdorff distance and HD95 per class."
        ),
    ] = True,
    csv_path: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Write one row per case and class (case, files, k, level, class, matched label, Dice, HD, HD95, unit, voxel counts, the case's mean Dice) to this CSV file; {part} in the name becomes the part id, which a run that is one part of several (--num-parts, Slurm arrays) needs.",
            parser=_file_name,
            metavar="PATH",
        ),
    ] = None,
    num_parts: Annotated[
        int | None,
        typer.Option(
            "--num-parts",
            min=1,
            help=EVAL_NUM_PARTS_HELP,
        ),
    ] = None,
    part_id: PartIdOption = None,
    recursive: Annotated[
        bool,
        typer.Option(
            "--recursive",
            "-r",
            help="Descend into sub-folders of the two folders (BIDS derivatives: sub-*/anat/).",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the full results as JSON on stdout.")
    ] = False,
) -> None:
    """Score segmentations against ground truth (Hungarian-matched Dice, HD, HD95).

    Pairing: files with the same case name are compared; <case>_k<K> (what
    `hypseg cluster` writes) is compared with <case>_L<level> (what `hypseg
    synth` writes), the level being --level or the level of dataset.json with K
    classes; a BIDS name (sub-01_desc-preproc_T1w_k4) with the one file of the
    same entities and the suffix dseg (sub-01_desc-aseg_dseg). The paper's score is the mean Dice over the ground truth's classes,
    each with its matched label, background included (a class left without a
    label, when there are fewer labels than classes, or matched to a label it
    shares no voxel with, counts as 0). A pair that
    cannot be scored is reported and the others are scored (exit code 2 if every
    failure was bad input, else 1). With --csv a run record is appended to
    hypseg-runs.jsonl beside the CSV file.
    """
    from . import pipeline

    with RichProgress() as progress:
        report = pipeline.evaluate(
            pred,
            truth,
            level=level,
            hausdorff=hausdorff,
            csv_path=csv_path,
            num_parts=num_parts,
            part_id=part_id,
            recursive=recursive,
            argv=state.argv,
            progress=progress,
        )
    _render_evaluation(report)
    _finish_batch(report, as_json, total=report["pairs"], what="pair")


def _render_evaluation(report: dict[str, Any]) -> None:
    if state.quiet or not report["cases"]:
        return
    from rich.table import Table

    table = Table(title="hypseg evaluate", title_justify="left")
    for column in ("case", "pred", "level", "mean Dice", "per-class Dice", "max HD95"):
        # names fold onto more lines rather than end in "..." (a batch log is 80 columns)
        table.add_column(column, overflow="fold" if column in ("case", "pred") else "ellipsis")
    for case in report["cases"]:
        dices = " ".join(f"{c['dice']:.3f}" for c in case["classes"])
        hd95 = [c["hd95"] for c in case["classes"] if c["hd95"] is not None]
        table.add_row(
            case["case"],
            Path(case["pred"]).name,
            "-" if case["level"] is None else str(case["level"]),
            f"{case['mean_dice']:.4f}",
            dices,
            (  # (no unit word where the header gives none: "2.00 unknown" read oddly)
                f"{max(hd95):.2f}" + ("" if case["unit"] in ("", "unknown") else f" {case['unit']}")
                if hd95
                else "-"
            ),
        )
    stderr.print(table)
    for group in report["summary"]:
        stderr.print(
            f"level {'-' if group['level'] is None else group['level']} "
            f"(k={'-' if group['k'] is None else group['k']}): mean Dice {group['mean_dice']:.4f} "
            f"± {group['std_dice']:.4f} over {group['n']} case(s)",
            markup=False,
        )


# ----------------------------------------------------------------------------- cache

cache_app = typer.Typer(
    help="Inspect or clear the cache of embeddings and k-means fits.", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")


@cache_app.command("path")
@handle_errors
def cache_path(
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
) -> None:
    """Print the cache folder."""
    from .cache import EmbeddingCache, resolve_cache_dir

    typer.echo(str(EmbeddingCache(resolve_cache_dir(cache_dir), create=False).root))


@cache_app.command("ls")
@handle_errors
def cache_ls(
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """List cached embeddings and k-means fits (key, size, shape, source volume)."""
    from .cache import EmbeddingCache, resolve_cache_dir

    cache = EmbeddingCache(resolve_cache_dir(cache_dir), create=False)
    entries = cache.entries()
    if as_json:
        emit_json(
            [
                {
                    "key": e.key,
                    "path": str(e.path),
                    "bytes": e.size,
                    "shape": list(e.shape),
                    "dtype": str(e.dtype),
                    "meta": e.meta,
                }
                for e in entries
            ]
        )
        return
    for e in entries:
        what = (
            f"  (k-means centroids, k={e.meta.get('k')})"
            if e.meta.get("kind") == "centroids"
            else ""
        )
        typer.echo(
            f"{e.key[:16]}  {_size_text(e.size):>9}  {'x'.join(map(str, e.shape)):>18}  {e.meta.get('volume', '')}{what}"
        )
    in_entries = sum(e.size + e.sidecar_size for e in entries)
    other = cache.total_bytes() - in_entries
    log.info(  # (informational: hidden by --quiet)
        "%s",
        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {_size_text(in_entries)}"
        + (f" (and {_size_text(other)} in other files)" if other > 0 else "")
        + f" in {cache.root}",
    )


def _size_text(size: float) -> str:
    """Bytes as B, kB, MB, GB or TB (powers of 1000), 3 significant digits."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 999.5:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1000.0
    return f"{size:.3g} TB"


@cache_app.command("clear")
@handle_errors
def cache_clear(
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
) -> None:
    """Remove every cached embedding and k-means fit."""
    from .cache import EmbeddingCache, resolve_cache_dir

    cache = EmbeddingCache(resolve_cache_dir(cache_dir), create=False)
    removed = cache.clear()
    log.info("removed %d entr%s from %s", removed, "y" if removed == 1 else "ies", cache.root)


# ----------------------------------------------------------------------------- entry point


def _own_options(ctx: Any) -> set[str]:
    """The option names of ``hypseg`` itself (``--quiet``, ``-q``...), which go before the
    command: those of the root command of ``ctx``."""
    return {name for p in ctx.find_root().command.params for name in p.opts + p.secondary_opts}


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors become one line and exit code 2."""
    import os

    # Idle OpenMP threads sleep instead of spinning: many short parallel
    # regions (k-means, tiled inference) run several times faster on busy
    # or shared nodes. Must be set before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    state.argv = ["hypseg", *(sys.argv[1:] if argv is None else argv)]
    if "" in state.argv:  # `hypseg synth "$OUT"` with OUT unset would write into "."
        i = state.argv.index("")
        before = state.argv[i - 1]
        stderr.print(
            f"hypseg: error: an empty argument after '{before}' (an unset shell variable?); "
            "no hypseg option or path takes an empty value",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    reset_terminations()
    restore = _on_sigterm_raise()
    try:
        code = app(args=argv, prog_name="hypseg", standalone_mode=False)
    except typer.Exit as exc:  # pragma: no cover - typer returns the code instead
        code = exc.exit_code
    except typer.Abort:
        stderr.print("hypseg: error: aborted", markup=False)
        code = 1
    except (HypsegError, KeyboardInterrupt) as exc:  # --debug: the traceback, the same code
        if isinstance(exc, HypsegError):
            code, message = exc.exit_code, str(exc)
        else:  # (also Ctrl-C before a command runs, without --debug)
            code, message = interrupt_status(exc)
        if state.debug:
            import traceback

            traceback.print_exc()
        else:
            stderr.print(f"hypseg: error: {message}", markup=False, highlight=False, soft_wrap=True)
    except Exception as exc:
        message = getattr(exc, "format_message", None)
        if message is None or not hasattr(exc, "exit_code"):  # --debug: an unexpected error
            import traceback

            traceback.print_exc()
            code = 1
        else:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            text = message()
            name = getattr(exc, "option_name", None)
            if ctx is not None and ctx.parent is not None and name in _own_options(ctx):
                # (QA: `hypseg cluster ... --quiet` was offered "Possible options: --nest")
                command = ctx.command_path.split(" ", 1)[-1]  # ("cache ls": both words)
                text = (
                    f"No such option: {name}: it is an option of hypseg itself and goes "
                    f"before the command: hypseg {name} {command} ..."
                )
                hint = ""
            if text.strip():  # empty after a bare `hypseg` or `hypseg cache`: help says it all
                stderr.print(
                    f"hypseg: error: {text}{hint}", markup=False, highlight=False, soft_wrap=True
                )
            code = exc.exit_code
    finally:
        restore()
    if (not code or code == 130) and termination_pending():
        # a SIGTERM whose exception could not stop the run (raised in a finaliser, which
        # Python reports as "Exception ignored" and drops), or one after the command ended;
        # or (130) one that typer turned into its KeyboardInterrupt code (with --debug,
        # where handle_errors lets it through)
        stderr.print("hypseg: error: terminated", markup=False, highlight=False)
        code = Terminated.exit_code
    if code:
        # What the failed command's frames held in reference cycles (a distributed job's
        # process group, through its DDP wrapper) goes now, not while the interpreter shuts
        # down, when its gloo threads cannot end cleanly (see distributed._leave).
        gc.collect()
    sys.exit(code if isinstance(code, int) else 0)


def _raise_terminated(signum: int, frame: Any) -> None:
    note_termination()
    if state.in_command:
        raise Terminated()


def _on_sigterm_raise() -> Callable[[], None]:
    """Make SIGTERM stop the command as Ctrl-C does (a run record, one error line, exit code
    143) instead of killing the interpreter; returns what puts the previous handler back
    (nothing to do where signals cannot be set: not the main thread, or no SIGTERM)."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return lambda: None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):  # pragma: no cover - embedded interpreters
        return lambda: None
    if previous is None:  # set outside Python: the default is the best we can put back
        previous = signal.SIG_DFL
    return lambda: signal.signal(signal.SIGTERM, previous)
