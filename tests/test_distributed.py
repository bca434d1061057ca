"""Distributed training: two CPU ranks (gloo) under torchrun agree, resume and fail cleanly."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from clitools import TINY_MODEL

from hypsegcli import distributed
from hypsegcli.cli import main
from hypsegcli.errors import BadInputError, HypsegError
from hypsegcli.modelfile import load_model_file
from hypsegcli.training import companion_paths

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

TINY = [*TINY_MODEL, "--checkpoint-every", "3"]  # thread counts are set per test
TORCHRUN_ENV = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999), where the port 0 bind used
    to pick from: there the sockets of gloo and other runs take ports too, and one could
    take this port before the job binds it."""
    ports = random.Random().sample(range(20000, 32000), 200)
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def _start_torchrun(args, *, cwd, dump=None):
    """Start ``torchrun --nproc-per-node 2 -m hypsegcli ARGS`` on the CPU (text pipes)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    # CPU ranks (gloo) even on a machine with GPUs: there --device auto means one
    # GPU per rank, refused where the node has fewer GPUs than ranks.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    if dump is not None:
        env[distributed.DEBUG_DUMP_ENV] = str(dump)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "hypsegcli",
        *map(str, args),
    ]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a hung run is killed with all its workers
    )


def _torchrun(args, *, cwd, dump=None, timeout=100):
    """``torchrun --nproc-per-node 2 -m hypsegcli ARGS`` on the CPU; (returncode, stdout, stderr)."""
    proc = _start_torchrun(args, cwd=cwd, dump=dump)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _dumps(folder):
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _history_steps(model_path):
    with open(companion_paths(model_path)[1]) as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def _copy_run(src_model, dst_dir):
    dst_dir.mkdir()
    for path in (src_model, *companion_paths(src_model)):
        shutil.copy2(path, dst_dir / path.name)
    return dst_dir / src_model.name


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    with pytest.raises(SystemExit) as info:
        main(["--quiet", "synth", str(root), "--n", "2", "--size", "20"])
    assert info.value.code == 0
    return root / "images"


@pytest.fixture(scope="module")
def six_steps(images, tmp_path_factory):
    """A 2-rank run of 6 steps: (model path, dump folder, returncode, stdout, stderr)."""
    work = tmp_path_factory.mktemp("dist")
    dump = work / "dump"
    code, out, err = _torchrun(
        ["train", images, "-o", "run/m.pt", "--steps", "6", "--json", "--threads", "1", *TINY],
        cwd=work,
        dump=dump,
    )
    return work / "run" / "m.pt", dump, code, out, err


def test_two_ranks_train_identical_weights_on_different_triplets(six_steps):
    model, dump, code, out, err = six_steps
    assert code == 0, err[-3000:]
    summary = json.loads(out)  # one JSON document: rank 0's
    assert summary["step"] == 6 and summary["world_size"] == 2
    assert err.count("wrote ") == 1 and err.count("train: 6/6") == 1  # rank 1 is quiet
    ranks = _dumps(dump)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["step"] for r in ranks} == {6}
    assert ranks[0]["state_dict_sha256"] == ranks[1]["state_dict_sha256"]
    assert ranks[0]["sample_rng_sha256"] != ranks[1]["sample_rng_sha256"]
    assert ranks[0]["noise_rng_sha256"] != ranks[1]["noise_rng_sha256"]
    ckpt = load_model_file(companion_paths(model)[0])
    assert ckpt["kind"] == "checkpoint" and ckpt["step"] == 6 and ckpt["world_size"] == 2
    assert len(ckpt["rng_state"]["ranks"]) == 2
    assert distributed.state_sha256(ckpt["state_dict"]) == ranks[0]["state_dict_sha256"]
    assert (
        distributed.state_sha256(load_model_file(model)["state_dict"])
        == (ranks[0]["state_dict_sha256"])
    )
    assert _history_steps(model) == list(range(1, 7))
    assert sorted(p.name for p in model.parent.iterdir()) == [
        "m.ckpt.pt",
        "m.history.csv",
        "m.pt",
    ]


def test_distributed_resume_continues_exactly(six_steps, images, tmp_path):
    model, *_ = six_steps
    resumed = _copy_run(model, tmp_path / "resumed")
    code, _, err = _torchrun(
        ["train", images, "-o", resumed, "--steps", "9", "--resume", "--threads", "1", *TINY],
        cwd=tmp_path,
        dump=tmp_path / "dump",
    )
    assert code == 0, err[-3000:]
    assert "resuming from step 6" in err and "re-seed" not in err
    ranks = _dumps(tmp_path / "dump")
    assert ranks[0]["state_dict_sha256"] == ranks[1]["state_dict_sha256"]
    assert {r["step"] for r in ranks} == {9}
    assert _history_steps(resumed) == list(range(1, 10))
    straight = tmp_path / "straight" / "m.pt"
    code, _, err = _torchrun(
        ["train", images, "-o", straight, "--steps", "9", "--threads", "1", *TINY], cwd=tmp_path
    )
    assert code == 0, err[-3000:]
    a, b = load_model_file(straight)["state_dict"], load_model_file(resumed)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_single_process_resumes_a_distributed_checkpoint(six_steps, images, tmp_path, capsys):
    model, *_ = six_steps
    copy = _copy_run(model, tmp_path / "single")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "train",
                str(images),
                "-o",
                str(copy),
                "--steps",
                "8",
                "--resume",
                "--threads",
                "2",
                *TINY,
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 0, err
    assert "written by 2 process(es), resuming on 1" in err
    doc = load_model_file(copy)
    assert doc["step"] == 8 and doc["world_size"] == 1
    assert _history_steps(copy) == list(range(1, 9))


def test_sigterm_checkpoints_every_rank_at_one_step_and_resume_continues_exactly(images, tmp_path):
    """A Slurm time limit or scancel (SIGTERM to torchrun, which passes it on to the ranks)
    used to stop every rank where it was, with no checkpoint: the steps since the last
    periodic one were lost. The ranks now stop at one step and save it; resumed on as many
    processes, the run reaches the weights of an uninterrupted one."""
    run = ["--threads", "1", *TINY_MODEL, "--checkpoint-every", "100000"]
    model = tmp_path / "cut" / "m.pt"
    proc = _start_torchrun(["train", images, "-o", model, "--steps", "100000", *run], cwd=tmp_path)
    try:
        for line in proc.stderr:  # rank 0's plain progress lines, one per update
            if line.startswith("train:"):
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code != 0, rest[-3000:]
    ckpt = load_model_file(companion_paths(model)[0])
    step = ckpt["step"]
    assert step >= 1 and ckpt["world_size"] == 2, rest[-3000:]
    assert rest.count(f"interrupted: the state after step {step} is in") == 1, rest[-3000:]
    assert rest.count("hypseg: error: terminated") == 2, rest[-3000:]
    # (torchrun prints a traceback of its own SignalException; the ranks print none)
    assert "hypsegcli/" not in rest and not model.exists()
    assert _history_steps(model) == list(range(1, step + 1))

    target = str(step + 2)
    code, _, err = _torchrun(
        ["train", images, "-o", model, "--steps", target, "--resume", *run],
        cwd=tmp_path,
        dump=tmp_path / "dump",
    )
    assert code == 0, err[-3000:]
    assert f"resuming from step {step}" in err and "re-seed" not in err
    straight = tmp_path / "straight" / "m.pt"
    code, _, err = _torchrun(
        ["train", images, "-o", straight, "--steps", target, *run], cwd=tmp_path
    )
    assert code == 0, err[-3000:]
    a, b = load_model_file(straight)["state_dict"], load_model_file(model)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert _history_steps(model) == list(range(1, step + 3))


def test_a_failing_rank_stops_the_job_without_hanging(images, tmp_path):
    dump = tmp_path / "dump"
    (dump / "rank1.json").mkdir(parents=True)  # rank 1 fails at its very end, rank 0 does not
    started = time.monotonic()
    code, _, err = _torchrun(
        ["train", images, "-o", "m.pt", "--steps", "1", "--threads", "1", *TINY],
        cwd=tmp_path,
        dump=dump,
        timeout=90,
    )
    assert code != 0 and time.monotonic() - started < 60
    errors = [line for line in err.splitlines() if line.startswith("hypseg: error:")]
    assert any("rank1.json: cannot write (Is a directory)" in line for line in errors), err
    assert "hypsegcli/training.py" not in err  # one-line errors, no worker tracebacks


def test_bad_input_fails_every_rank(images, tmp_path):
    code, _, err = _torchrun(
        ["train", images, "-o", "m.pt", "--resume", "--threads", "1", *TINY], cwd=tmp_path
    )
    errors = [line for line in err.splitlines() if line.startswith("hypseg: error:")]
    assert code != 0 and 1 <= len(errors) <= 2, err  # torchrun may stop rank 1 first
    assert all("no checkpoint to resume from" in line for line in errors)


def _two_ranks(per_rank_args, *, cwd, timeout=60):
    """Rank 0 and rank 1 started by hand (as torchrun would), each with its own arguments:
    [(returncode, stderr)] per rank."""
    port = _free_port()
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
        env.update(
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            **{distributed.TIMEOUT_ENV: "120"},
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hypsegcli", *map(str, args)],
                cwd=cwd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"a rank waited for {timeout} s (the job hung)")
        results.append((proc.returncode, err))
    return results


def test_a_rank_failing_on_its_inputs_stops_the_others_at_once(images, tmp_path):
    """Ranks that read different files (local disks): one that cannot read its inputs, or
    reads other volumes, stops every rank before the first step, each with one line."""
    train = ["-o", "m.pt", "--steps", "2", "--threads", "1", *TINY]
    started = time.monotonic()
    (rank0, err0), (rank1, err1) = _two_ranks(
        [["train", images, *train], ["train", tmp_path / "nowhere", *train]], cwd=tmp_path
    )
    assert time.monotonic() - started < 50  # not the 120 s timeout
    assert rank1 == 2 and err1.strip().endswith("nowhere: no such file or folder"), err1
    assert rank0 == 2, err0
    assert err0.strip().splitlines()[-1] == (
        f"hypseg: error: rank 0: stopped, as rank 1 could not start: {tmp_path / 'nowhere'}: "
        "no such file or folder"
    ), err0
    assert "Traceback" not in err0 + err1 and not (tmp_path / "m.pt").exists()
    # rank 1 reads one volume fewer
    few = tmp_path / "few"
    few.mkdir()
    first = sorted(images.iterdir())[0]
    shutil.copy2(first, few / first.name)
    (rank0, err0), (rank1, err1) = _two_ranks(
        [["train", images, *train], ["train", few, *train]], cwd=tmp_path
    )
    assert rank0 == rank1 == 2
    assert (
        "hypseg: error: rank 1: read 1 training volume(s), rank 0 read 2; every rank must "
        "read the same files (a shared filesystem)"
    ) in err1, err1
    assert "rank 0: stopped, as another rank read other training data than rank 0" in err0
    assert not (tmp_path / "m.pt").exists()


def _torchrun_script(path, text, *args):
    """Run the Python script ``text`` (written to ``path``) with ``args`` as 2 torchrun
    ranks on the CPU; the finished process (stdout and stderr captured)."""
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(path), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)


LEAVE_SCRIPT = """
import json, os, sys, torch
from hypsegcli import distributed

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(1)
warm = torch.nn.Linear(3, 1)
warm(torch.randn(4, 3)).sum().backward()  # the threads a step starts, before counting
before = threads()
with distributed.session(torch.device("cpu")) as job:
    model = torch.nn.Linear(3, 1)
    model.loss = lambda x: {"total": model(x).sum()}
    job.wrap(model)(torch.randn(4, 3))["total"].backward()  # DDP, as training does
    job.gather({"rank": job.rank})
    job.barrier()
    during = threads()
# one write (with PYTHONUNBUFFERED set, as on this project's machines, print's newline is a
# write of its own, and the two ranks' lines interleaved: 1 run in 15)
sys.stdout.write(json.dumps({"before": before, "during": during, "after": threads()}) + "\\n")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_leaving_the_job_ends_its_gloo_threads(tmp_path):
    """A rank that left the job has no gloo worker threads left: one that freed a finished
    collective while the interpreter shut down aborted the rank after a successful run
    (1 run in 40 on a loaded machine). The default group was kept alive by
    torch.distributed.nn's default arguments and the DDP wrapper's reference cycle."""
    proc = _torchrun_script(tmp_path / "leave.py", LEAVE_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(counts) == 2
    for count in counts:
        assert count["during"] > count["before"], count  # (the count sees gloo's threads)
        assert count["after"] == count["before"], count


DEBUG_FAILURE_SCRIPT = """
import atexit, json, os, sys, torch
from hypsegcli import cli, sampling

def threads():
    return len(os.listdir("/proc/self/task"))

# atexit runs before the interpreter shuts down: what is alive then is torn down with it
atexit.register(lambda: sys.stdout.write(json.dumps({"at_exit": threads()}) + "\\n"))
calls = []
sample = sampling.TripletSampler.sample

def failing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) > 2:  # an unexpected error in the middle of training, on every rank
        raise RuntimeError("boom")
    return sample(self, *args, **kwargs)

sampling.TripletSampler.sample = failing
torch.set_num_threads(1)
warm = torch.nn.Linear(3, 1)
warm(torch.randn(4, 3)).sum().backward()
sys.stdout.write(json.dumps({"before": threads()}) + "\\n")  # one write: see LEAVE_SCRIPT
cli.main(sys.argv[1:])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_debug_traceback_does_not_keep_the_job_into_shutdown(tmp_path, images):
    """With --debug an unexpected error's traceback held the training frames, and so the
    process group, until the interpreter shut down, where its gloo threads could abort the
    rank (the race of test_leaving_the_job_ends_its_gloo_threads): they end before it now,
    and the traceback and exit code 1 stay."""
    train = ["train", str(images), "-o", str(tmp_path / "m.pt"), "--steps", "10"]
    proc = _torchrun_script(tmp_path / "fail.py", DEBUG_FAILURE_SCRIPT, "--debug", *train)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count('raise RuntimeError("boom")') == 2, proc.stderr[-3000:]
    counts = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    before = [c["before"] for c in counts if "before" in c]
    at_exit = [c["at_exit"] for c in counts if "at_exit" in c]
    assert len(before) == len(at_exit) == 2 and max(at_exit) == before[0] == before[1], counts
    assert not (tmp_path / "m.pt").exists()


# ----------------------------------------------------------------------------- in process


def test_environment_detection(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size() == 1 and not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.is_main_process()
    monkeypatch.setenv("RANK", "3")  # ignored without WORLD_SIZE > 1
    assert distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.is_distributed() and distributed.rank() == 3
    assert distributed.local_rank() == 1 and not distributed.is_main_process()
    assert distributed.per_rank_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(BadInputError, match="share one GPU"):
        distributed.per_rank_device(torch.device("cuda", 0))
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(BadInputError, match="WORLD_SIZE='two': expected an integer"):
        distributed.world_size()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "-5")
    with pytest.raises(BadInputError, match="HYPSEG_DIST_TIMEOUT='-5'"):
        distributed.timeout_seconds()


def test_other_ranks_log_warnings_only(monkeypatch):
    logger = logging.getLogger("hypsegcli")
    before = logger.level
    try:
        logger.setLevel(logging.INFO)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        distributed.quiet_other_ranks()
        assert logger.level == logging.INFO
        monkeypatch.setenv("RANK", "1")
        distributed.quiet_other_ranks()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)


def test_a_torch_without_distributed_is_named(monkeypatch):
    """Under torchrun with a torch built without torch.distributed (whose stubs cannot
    import torch.distributed.nn): one line saying so, not an ImportError."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch.distributed.nn", None)  # its import fails
    with pytest.raises(HypsegError, match="this torch build has no torch.distributed"):
        with distributed.session(torch.device("cpu")):
            pass


def test_single_process_session_is_the_identity(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with distributed.session(torch.device("cpu")) as job:
        assert job == distributed.Distributed() and job.is_main and not job.enabled
        values = {"total": torch.tensor(1.5)}
        assert job.average(values) is values
        assert job.gather("x") == ["x"]
        for flags in [(True, False), (False, True), (True, True), (False, False)]:
            assert job.stop_votes(*flags) == flags
        job.barrier()
        model = torch.nn.Linear(2, 2)
        model.loss = lambda *a, **k: {}  # type: ignore[attr-defined]
        assert job.wrap(model) is model.loss
    assert not torch.distributed.is_initialized()


def test_first_line_of_collective_errors():
    exc = RuntimeError(
        "[/w/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:55434. This is typically caused by a remote worker crashing.\nmore"
    )
    assert distributed._is_collective_error(exc)
    assert distributed._first_line(exc) == "Connection closed by peer [127.0.0.1]:55434"
    assert not distributed._is_collective_error(RuntimeError("CUDA out of memory"))


def test_ranks_of_different_seeds_share_no_stream():
    """Review: rank r seeded with seed + 1 + 2r, so rank 1 of --seed 0 drew the triplets
    (and noise) of --seed 2's rank 0, and seed replicates under torchrun were not
    independent. Rank 0 keeps a single process's seeds."""
    from hypsegcli.training import stream_seed

    assert [stream_seed(s, 0, k) for s in (0, 7) for k in (1, 2)] == [1, 2, 8, 9]
    # (rank 0's are seed + 1 and seed + 2, a single process's, as before)
    others = [stream_seed(s, r, k) for s in range(50) for r in range(1, 8) for k in (1, 2)]
    firsts = {stream_seed(s, 0, k) for s in range(50) for k in (1, 2)}
    assert len(set(others)) == len(others) and not firsts & set(others)
    assert all(0 <= v < 2**63 for v in others)
    assert stream_seed(2**63 - 1, 5, 2) == stream_seed(2**63 - 1, 5, 2)  # deterministic
