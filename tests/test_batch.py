"""Batch jobs: parts, Slurm arrays, skip/overwrite, per-volume failures, manifests, dry runs, examples."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from clitools import TINY_TRAIN, run, tiny_pipeline

from hypsegcli import batch, embedding, io, pipeline
from hypsegcli.batch import MANIFEST_NAME, Part, read_manifest, resolve_part, select_part
from hypsegcli.errors import BadInputError, HypsegError

REPO = Path(__file__).resolve().parents[1]
CASES = ("case_000", "case_001", "case_002")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on 3 synthetic volumes."""
    return tiny_pipeline(tmp_path_factory.mktemp("batch"), steps=3)


def cluster_argv(trained, out, *extra):
    return [
        "cluster",
        trained / "data" / "images",
        "-m",
        trained / "model.pt",
        "--k",
        "2",
        "--k",
        "3",
        "-o",
        out,
        "--threads",
        "2",
        "--patch-size",
        "9",  # m/p = 1: one phase grid, the fastest embedding of the tiny model
        "--n-init",
        "1",
        "--json",
        *extra,
    ]


# ----------------------------------------------------------------------------- parts


def test_one_task_array_resubmitted_alone_warns_that_it_does_everything(caplog):
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "3"}
    with caplog.at_level(logging.WARNING):
        part = resolve_part(None, None, env)
    assert (part.index, part.count) == (0, 1)
    assert "a Slurm array of one task processes every input" in caplog.text
    assert (
        "--num-parts N --part-id I" in caplog.text
        and "e.g. 2 for task 3 of --array=1-N" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_part(None, None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"})
    assert caplog.text == ""  # --array=0: one job on purpose


def test_resolve_part_from_options_and_slurm():
    assert resolve_part(None, None, {}) == Part()
    assert resolve_part(4, 3, {"SLURM_ARRAY_TASK_ID": "9"}).index == 3  # options win
    assert resolve_part(1, None, {"SLURM_ARRAY_TASK_ID": "9"}).count == 1
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    part = resolve_part(None, None, env)
    assert (part.index, part.count, part.source) == (0, 3, "slurm")
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_part(None, None, env).index == 2  # MIN unset: 0
    env = {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "4"}
    assert resolve_part(None, None, env).index == 2  # --array=0-8:4
    for bad_options, fragment in (
        ((4, None), "--num-parts 4: needs --part-id"),
        ((None, 1), "--part-id 1: needs --num-parts"),
        ((3, 3), "--part-id 3: should be between 0 and 2"),
    ):
        with pytest.raises(BadInputError, match=fragment):
            resolve_part(*bad_options, {})
    for env, fragment in (
        ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not"),
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM_ARRAY_TASK_ID='x'"),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2"}, "pass --num-parts"),
    ):
        with pytest.raises(BadInputError, match=fragment):
            resolve_part(None, None, env)


def test_select_part_is_a_round_robin_partition_of_the_sorted_inputs():
    items = [f"v{i:02d}" for i in range(11)]
    shuffled = [items[i] for i in np.random.default_rng(0).permutation(11)]
    parts = [select_part(shuffled, Part(i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == items  # disjoint, complete
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sorted(parts[1]) == items[1::3]  # round-robin over the sorted list
    assert parts[1] == [x for x in shuffled if x in items[1::3]]  # given order kept
    assert select_part(items, Part()) == items


# ----------------------------------------------------------------------------- concurrency


def _spawn(code: str, n: int) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(i)], cwd=REPO, stderr=subprocess.PIPE
        )
        for i in range(n)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()


def test_a_manifest_record_cut_by_a_full_disk_costs_no_other(tmp_path, monkeypatch):
    """Review: a short write (ENOSPC) left ~1 900 bytes of a record without its newline,
    the next run's record was glued to them, and both were lost (and `jq -s` failed)."""
    import errno as errno_module

    batch.append_manifest(tmp_path, {"run": 1})
    path = tmp_path / MANIFEST_NAME
    before = path.read_bytes()
    real_write = os.write

    def full_disk(fd, data):
        if len(data) > 10:  # half of it lands, then the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno_module.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch.os, "write", full_disk)
    with pytest.raises(HypsegError, match="cannot append to the run manifest"):
        batch.append_manifest(tmp_path, {"run": 2, "pad": "x" * 1000})
    monkeypatch.setattr(batch.os, "write", real_write)
    assert path.read_bytes() == before  # taken back
    # a cut record that stayed (a run killed mid-write): the next one starts a line of its own
    with open(path, "ab") as handle:
        handle.write(b'{"run": 3, "pad": "xxx')
    batch.append_manifest(tmp_path, {"run": 4})
    assert [r["run"] for r in read_manifest(path)] == [1, 4]
    assert path.read_bytes().endswith(b'"xxx\n{"run":4}\n')


def test_concurrent_manifest_appends_lose_nothing(tmp_path):
    code = f"""
        import sys
        from hypsegcli.batch import append_manifest
        me = int(sys.argv[1])
        for j in range(100):
            append_manifest({str(tmp_path)!r}, {{"writer": me, "j": j, "pad": "x" * 50000}})
    """
    _spawn(code, 4)
    records = read_manifest(tmp_path / MANIFEST_NAME)
    assert sorted((r["writer"], r["j"]) for r in records) == [
        (w, j) for w in range(4) for j in range(100)
    ]
    assert all(len(r["pad"]) == 50000 for r in records)


def test_merged_view_converges_with_concurrent_writers(tmp_path):
    """A slow writer renaming a stale view after a fast one rebuilds it (no lock needed)."""
    import threading
    import time

    from hypsegcli.io import write_text_atomic

    def parts():
        return list(tmp_path.glob("[!.]*.part"))

    def writer(name: str, delay: float, build_time: float, attempts: int) -> None:
        time.sleep(delay)
        for j in range(5):
            write_text_atomic(tmp_path / f"{name}{j}.part", f"{name}{j}")

        def build(files):
            text = "\n".join(sorted(p.read_text() for p in files))
            time.sleep(build_time)
            return text

        batch.rebuild_merged(tmp_path / "merged.txt", parts, build, attempts=attempts)

    # (with attempts=1, i.e. without the re-check, "a" leaves a view without "b"'s parts)
    threads = [
        threading.Thread(target=writer, args=("a", 0.0, 0.4, 50)),
        threading.Thread(target=writer, args=("b", 0.15, 0.0, 50)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = set((tmp_path / "merged.txt").read_text().split("\n"))
    assert merged == {f"{w}{j}" for w in "ab" for j in range(5)}


def test_failures_summary_and_exit_codes():
    failures = batch.Failures(3)
    assert failures.exit_code == 0
    failures.record("a/x.nii.gz", BadInputError("a/x.nii.gz: cannot read NIfTI (junk)"))
    assert failures.exit_code == 2
    failures.record("a/y.nii.gz", RuntimeError("a device error\nsecond line"))
    assert failures.exit_code == 1
    rows = failures.to_json()
    assert rows[1]["error"] == "a/y.nii.gz: RuntimeError: a device error"
    line = batch.failure_summary(rows, 3)
    assert line.startswith("2 of 3 volume(s) failed (1 bad input, 1 runtime): x.nii.gz, y.nii.gz")
    assert batch.failure_summary(rows[:1], 1) == rows[0]["error"]
    assert line.endswith("; the others were processed")
    # all failed: no "others" (review)
    assert batch.failure_summary(rows, 2).endswith("x.nii.gz, y.nii.gz")


# ----------------------------------------------------------------------------- cluster


def _labels(path):
    return io.read_volume(path).data


def test_a_slurm_task_left_without_inputs_fails(trained, tmp_path, capsys, monkeypatch):
    """`sbatch --array=0-2 ... hypseg embed ${files[$SLURM_ARRAY_TASK_ID]}`: each task names
    its own input, and the implicit split would leave all but task 0 with nothing to do."""
    image = trained / "data" / "images" / "case_002.nii.gz"
    argv = ["embed", image, "-m", trained / "model.pt", "-o", tmp_path / "emb"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "" and not (tmp_path / "emb" / "case_002.npy").exists()
    assert err.strip().splitlines()[-1] == (
        "hypseg: error: part 2 of 3 (from SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_MIN=0, "
        "SLURM_ARRAY_TASK_COUNT=3) has none of the 1 volume(s): a Slurm array splits the "
        "inputs it is given among its tasks; if every task names its own inputs, pass "
        "--num-parts 1, or else run an array of at most 1 task(s)"
    )
    code, out, err = run([*argv, "--num-parts", "1"], capsys)
    assert code == 0 and (tmp_path / "emb" / "case_002.npy").is_file(), err
    # a split the command line asks for is taken as meant: a warning, nothing to do
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    code, out, err = run([*argv, "--num-parts", "3", "--part-id", "2"], capsys)
    assert code == 0 and "part 2 of 3 has no volumes (1 in all): nothing to do" in err


def test_cluster_parts_share_a_folder_and_resume(trained, tmp_path, capsys, monkeypatch):
    seg = tmp_path / "seg"
    code, out, err = run(cluster_argv(trained, seg, "--num-parts", "2", "--part-id", "1"), capsys)
    assert code == 0, err
    first = json.loads(out)
    assert [Path(v["volume"]).name for v in first["volumes"]] == ["case_001.nii.gz"]
    # part 0 from a Slurm array starting at 1 (task 1 of 2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "777")
    code, out, err = run(cluster_argv(trained, seg), capsys)
    assert code == 0, err
    second = json.loads(out)
    assert second["part"]["part_id"] == 0 and second["part"]["source"] == "slurm"
    assert [Path(v["volume"]).name for v in second["volumes"]] == [
        "case_000.nii.gz",
        "case_002.nii.gz",
    ]
    for case in CASES:
        for k in (2, 3):
            assert (seg / f"{case}_k{k}.nii.gz").is_file()
    merged = json.loads((seg / "centroids.json").read_text())
    assert sorted((s["case"], s["k"]) for s in merged["sets"]) == [
        (c, k) for c in CASES for k in (2, 3)
    ]
    records = read_manifest(seg / MANIFEST_NAME)
    assert [r["part"]["part_id"] for r in records] == [1, 0]
    assert records[1]["slurm"]["SLURM_ARRAY_JOB_ID"] == "777"
    rec = records[1]
    assert rec["exit_status"] == 0 and rec["command"] == "cluster" and rec["seed"] == 0
    assert set(rec["versions"]) >= {"hypseg", "torch", "geoopt"} and rec["host"]
    assert rec["model_sha256"] == io.file_sha256(trained / "model.pt")
    assert rec["config"]["ks"] == [2, 3] and rec["config"]["skip_existing"] is True
    assert rec["started"] <= rec["finished"]
    row = rec["inputs"][0]
    volume = io.read_volume(trained / "data" / "images" / "case_000.nii.gz")
    assert row["sha256"] == io.array_sha256(volume.data)
    assert set(row["seconds"]) == {"read", "embed", "cluster", "write"}

    # resubmitting skips complete volumes without reading them or running the encoder
    before = _labels(seg / "case_000_k2.nii.gz")
    mtime = (seg / "case_000_k2.nii.gz").stat().st_mtime_ns
    (seg / "case_002_k3.nii.gz").unlink()  # a task killed half-way through case_002

    def boom(*args, **kwargs):
        raise AssertionError("encoder ran although the embeddings are cached")

    monkeypatch.setattr(embedding, "embed_volume", boom)
    code, out, err = run(cluster_argv(trained, seg), capsys)
    assert code == 0, err
    again = json.loads(out)
    assert [v["status"] for v in again["volumes"]] == ["skipped", "done"]
    assert (seg / "case_000_k2.nii.gz").stat().st_mtime_ns == mtime
    assert (seg / "case_002_k3.nii.gz").is_file()
    # --overwrite redoes it (from the cache), with the same result
    code, out, err = run(cluster_argv(trained, seg, "--overwrite"), capsys)
    assert code == 0, err
    assert [v["status"] for v in json.loads(out)["volumes"]] == ["done", "done"]
    np.testing.assert_array_equal(_labels(seg / "case_000_k2.nii.gz"), before)
    assert len(read_manifest(seg / MANIFEST_NAME)) == 4
    # another k redoes the volumes; the sets of the earlier k are kept
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    images, model = trained / "data" / "images", trained / "model.pt"
    code, out, err = run(
        ["cluster", images, "-m", model, "--k", "4", "-o", seg, "--threads", "2", "-p", "9"]
        + ["--n-init", "1"]
        + ["--num-parts", "3", "--part-id", "0"],
        capsys,
    )
    assert code == 0, err
    doc = json.loads((seg / "case_000.centroids.json").read_text())
    assert [s["k"] for s in doc["sets"]] == [2, 3, 4]


def test_failing_volumes_are_reported_and_the_others_processed(
    trained, tmp_path, capsys, monkeypatch
):
    data = tmp_path / "in"
    data.mkdir()
    for case in CASES:
        (data / f"{case}.nii.gz").write_bytes(
            (trained / "data" / "images" / f"{case}.nii.gz").read_bytes()
        )
    (data / "case_bad.nii.gz").write_bytes(b"junk")
    argv = [
        "cluster",
        data,
        "-m",
        trained / "model.pt",
        "--k",
        "2",
        "-o",
        tmp_path / "seg",
        "--threads",
        "2",
        "-p",
        "9",
        "--n-init",
        "1",
        "--json",
    ]
    code, out, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert lines[0].startswith(f"error: {data / 'case_bad.nii.gz'}: cannot read NIfTI")
    assert lines[-1].startswith("hypseg: error: 1 of 4 volume(s) failed (1 bad input): case_bad")
    summary = json.loads(out)
    assert [Path(f["volume"]).name for f in summary["failures"]] == ["case_bad.nii.gz"]
    assert summary["failures"][0]["exit_code"] == 2
    assert all((tmp_path / "seg" / f"{c}_k2.nii.gz").is_file() for c in CASES)
    (record,) = read_manifest(tmp_path / "seg" / MANIFEST_NAME)
    assert record["exit_status"] == 2 and len(record["failures"]) == 1

    # a runtime failure (not bad input) gives exit code 1
    real = pipeline.read_volume

    def flaky(path, **kwargs):
        if Path(path).name == "case_001.nii.gz":
            raise RuntimeError("disk on fire")
        return real(path, **kwargs)

    monkeypatch.setattr(pipeline, "read_volume", flaky)
    code, out, err = run([*argv, "--overwrite"], capsys)
    assert code == 1
    assert "case_001.nii.gz: RuntimeError: disk on fire" in err
    assert "2 of 4 volume(s) failed (1 bad input, 1 runtime)" in err
    assert read_manifest(tmp_path / "seg" / MANIFEST_NAME)[-1]["exit_status"] == 1


def test_pooled_fitting_needs_one_part(trained, tmp_path, capsys):
    code, _, err = run(
        [*cluster_argv(trained, tmp_path / "a", "--fit-on", "pooled"), "--num-parts", "2"]
        + ["--part-id", "0"],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert "--fit-on pooled needs all inputs" in err and "--centroids" in err
    assert not (tmp_path / "a").exists()
    code, _, err = run(cluster_argv(trained, tmp_path / "fit", "--fit-on", "pooled"), capsys)
    assert code == 0, err
    for i in (0, 1):
        code, _, err = run(
            cluster_argv(
                trained,
                tmp_path / "b",
                "--centroids",
                tmp_path / "fit" / "centroids.json",
                "--num-parts",
                "2",
                "--part-id",
                str(i),
            ),
            capsys,
        )
        assert code == 0, err
    for case in CASES:
        np.testing.assert_array_equal(
            _labels(tmp_path / "fit" / f"{case}_k3.nii.gz"),
            _labels(tmp_path / "b" / f"{case}_k3.nii.gz"),
        )
    doc = json.loads((tmp_path / "b" / "centroids.json").read_text())
    assert [(s["case"], s["k"]) for s in doc["sets"]] == [(None, 2), (None, 3)]


def test_dry_run_plans_without_writing(trained, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    argv = cluster_argv(trained, tmp_path / "seg", "--cache-dir", cache, "--dry-run")
    code, out, err = run(argv, capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] and plan["counts"]["compute"] == 3
    row = plan["volumes"][0]
    assert row["shape"] == [20, 20, 20] and row["voxels"] == 8000
    assert row["seconds"] > 0 and row["peak_bytes"] > 8000 * 4
    assert plan["flop_rate"] > 0 and plan["flops_per_voxel"] > 0
    assert plan["estimated_peak_bytes"] >= row["peak_bytes"] and "estimate" in plan["notes"].lower()
    assert not (tmp_path / "seg").exists() and not cache.exists()
    # after a run of part 0: case_000 and case_002 done; case_001 not (its cache entry neither)
    code, _, err = run(
        cluster_argv(trained, tmp_path / "seg", "--cache-dir", cache, "--num-parts", "2")
        + ["--part-id", "0"],
        capsys,
    )
    assert code == 0, err
    from hypsegcli.cache import LAYOUT

    stamp = (cache / LAYOUT).stat().st_mtime_ns
    code, out, _ = run(argv, capsys)
    assert [v["state"] for v in json.loads(out)["volumes"]] == ["done", "compute", "done"]
    assert (cache / LAYOUT).stat().st_mtime_ns == stamp  # no write probe in the cache either
    code, out, _ = run([*argv, "--overwrite"], capsys)
    assert [v["state"] for v in json.loads(out)["volumes"]] == ["cached", "compute", "cached"]
    # embed's plan; the human-readable plan goes to stderr
    code, out, err = run(
        ["embed", trained / "data" / "images", "-m", trained / "model.pt", "--patch-size", "9"]
        + ["--cache-dir", cache, "--dry-run", "--stride", "2"],
        capsys,
    )
    assert code == 0 and out == ""
    assert "est. peak memory" in err and "case_001.nii.gz" in err
    # a volume that cannot be read fails the dry run (a `--dry-run && sbatch` gate), with
    # its error on a line of its own even under -q
    bad = tmp_path / "bad"
    bad.mkdir()
    good = trained / "data" / "images" / "case_000.nii.gz"
    (bad / "case_000.nii.gz").write_bytes(good.read_bytes())
    (bad / "cut.nii.gz").write_bytes(good.read_bytes()[:3000])
    code, out, err = run(
        ["-q", "cluster", bad, "-m", trained / "model.pt", "--k", "2", "-o", tmp_path / "s"]
        + ["--patch-size", "9", "--cache-dir", cache, "--dry-run", "--json"],
        capsys,
    )
    assert code == 2
    assert [v["state"] for v in json.loads(out)["volumes"]] == ["cached", "error"]
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error: {bad / 'cut.nii.gz'}: truncated NIfTI"), err
    assert lines[1] == "hypseg: error: dry run: 1 of 2 volume(s) could not be planned"


def test_kmeans_estimate_counts_each_pass_of_a_fit():
    from hypsegcli.batch import (
        KMEANS_ASSIGN_S,
        KMEANS_FIT_S,
        REFERENCE_RATE,
        SKLEARN_FIT_S,
        estimate_kmeans_seconds,
    )
    from hypsegcli.kmeans import _RESTART_SAMPLES

    def est(voxels, ks, n_init, **kw):
        kw.setdefault("flop_rate", REFERENCE_RATE)
        return estimate_kmeans_seconds(voxels, ks, n_init=n_init, fit_samples=200_000, **kw)

    n = 1_000_000  # restarts on the restart sample, one refinement on the fit sample
    want = KMEANS_FIT_S * (3 * _RESTART_SAMPLES + 200_000) + KMEANS_ASSIGN_S * n
    assert est(n, [2, 8], 3) == pytest.approx(10 * want)
    # a small volume: every pass sees all its voxels
    assert _RESTART_SAMPLES > 10_000
    want = KMEANS_FIT_S * 3 * 10_000 + KMEANS_ASSIGN_S * 10_000
    assert est(10_000, [4], 2) == pytest.approx(4 * want)
    assert est(n, [4], 0) == pytest.approx(4 * KMEANS_ASSIGN_S * n)  # assignment only
    want = SKLEARN_FIT_S * 2 * 200_000 + KMEANS_ASSIGN_S * n
    assert est(n, [4], 2, euclidean=True) == pytest.approx(4 * want)
    assert est(n, [4], 2, flop_rate=2 * REFERENCE_RATE) == pytest.approx(est(n, [4], 2) / 2)


def test_kmeans_estimate_counts_the_silhouette_once_per_fit_and_restart():
    from hypsegcli.batch import (
        REFERENCE_RATE,
        SILHOUETTE_DIST_LINE_S,
        SILHOUETTE_DIST_S,
        SILHOUETTE_S,
        estimate_kmeans_seconds,
    )
    from hypsegcli.kmeans import _SILHOUETTE_SAMPLES

    assert SILHOUETTE_DIST_S > 0 and SILHOUETTE_DIST_LINE_S > 0 and SILHOUETTE_S > 0

    def est(voxels, ks, n_init, **kw):
        kw.setdefault("flop_rate", REFERENCE_RATE)
        return estimate_kmeans_seconds(voxels, ks, n_init=n_init, fit_samples=200_000, **kw)

    n = 1_000_000
    for euclidean, dist in ((False, SILHOUETTE_DIST_S), (True, SILHOUETTE_DIST_LINE_S)):
        extra = est(n, [2, 8], 8, select="silhouette", euclidean=euclidean)
        extra -= est(n, [2, 8], 8, euclidean=euclidean)
        assert extra == pytest.approx(2 * (dist + 8 * SILHOUETTE_S) * _SILHOUETTE_SAMPLES**2)
    # fewer points than the subset: all of them; one restart or none: nothing to choose
    extra = est(500, [4], 3, select="silhouette") - est(500, [4], 3)
    assert extra == pytest.approx((SILHOUETTE_DIST_S + 3 * SILHOUETTE_S) * 500**2)
    assert est(n, [4], 1, select="silhouette") == est(n, [4], 1)
    assert est(n, [4], 0, select="silhouette") == est(n, [4], 0)


def test_embedding_estimate_scales_with_the_encoders_efficiency(trained):
    from hypsegcli.batch import GPU_ENCODER_EFFICIENCY, TILE_OVERHEAD_S, estimate_embedding
    from hypsegcli.embedding import DEFAULT_TILE

    model = pipeline.LoadedModel(trained / "model.pt", "cpu").model
    kw = dict(patch_size=model.cfg.patch_size, stride=1, tile=DEFAULT_TILE, workers=1)
    cpu = estimate_embedding(model, (20, 20, 20), flop_rate=1e9, **kw)
    gpu = estimate_embedding(
        model, (20, 20, 20), flop_rate=1e9, efficiency=GPU_ENCODER_EFFICIENCY, **kw
    )
    overhead = cpu["tiles"] * TILE_OVERHEAD_S
    assert cpu["seconds"] == pytest.approx(cpu["flops"] / 1e9 + overhead)  # CPU: the full rate
    assert gpu["seconds"] - overhead == pytest.approx(cpu["flops"] / 1e9 / GPU_ENCODER_EFFICIENCY)


def test_embedding_memory_counts_tiles_clipped_to_the_volume(trained):
    """A thin tomogram (64x64x32) with --tile 64 runs one tile of 64x64x32 on one thread,
    but the estimate counted two threads of full 64^3 tiles: 4095 MiB against 1138 MiB
    measured (now 1261)."""
    from hypsegcli.batch import _tile_activation_bytes, estimate_embedding

    model = pipeline.LoadedModel(trained / "model.pt", "cpu").model
    p = model.cfg.patch_size
    full = _tile_activation_bytes(model, p, 1, 64)
    assert _tile_activation_bytes(model, p, 1, 64, (64, 64, 64)) == full
    assert _tile_activation_bytes(model, p, 1, 64, (200, 100, 64)) == full
    thin = _tile_activation_bytes(model, p, 1, 64, (64, 64, 32))
    assert thin < 0.6 * full
    assert thin == _tile_activation_bytes(model, p, 1, 64, (32, 64, 64))  # any axis
    kw = dict(patch_size=p, stride=1, tile=64, flop_rate=1e9)
    one = estimate_embedding(model, (64, 64, 32), workers=1, **kw)
    two = estimate_embedding(model, (64, 64, 32), workers=2, **kw)
    assert one["tiles"] == 1 and two["activation_bytes"] == one["activation_bytes"] == thin
    many = estimate_embedding(model, (64, 64, 32), workers=2, **{**kw, "tile": 16})
    assert many["tiles"] > 2
    assert many["activation_bytes"] == 2 * _tile_activation_bytes(model, p, 1, 16, (64, 64, 32))


def test_strided_embedding_memory_counts_one_slab_of_float64_not_the_volume(trained):
    """``--stride`` > 1 interpolates in slabs of x-planes (``embedding._upsample``), but
    the estimate still counted three float64 copies of the whole volume's embeddings:
    5.5 GiB for a 512x512x300 tomogram at stride 2, where ``embed`` peaked at 1.8 GiB."""
    from hypsegcli.batch import estimate_embedding
    from hypsegcli.embedding import DEFAULT_TILE

    model = pipeline.LoadedModel(trained / "model.pt", "cpu").model
    d = model.cfg.latent_dim
    kw = dict(patch_size=model.cfg.patch_size, tile=DEFAULT_TILE, workers=1, flop_rate=1e9)
    for shape in [(512, 512, 300), (40, 30, 20)]:
        voxels, plane = int(np.prod(shape)), shape[1] * shape[2]
        one = estimate_embedding(model, shape, stride=1, **kw)["array_bytes"]
        two = estimate_embedding(model, shape, stride=2, **kw)["array_bytes"]
        lattice = int(np.prod([len(embedding._lattice(n, 2)) for n in shape]))
        slab = min(voxels, max(1, embedding.UPSAMPLE_BLOCK // plane) * plane)
        # the lattice's float32 embeddings, and a few float64 copies of one slab
        assert two - one == pytest.approx(4.0 * lattice * d + 4 * 8.0 * slab * d)
        if voxels > 10 * embedding.UPSAMPLE_BLOCK:
            assert two - one < 0.2 * (3 * 8.0 * voxels * d)  # not of the whole volume


def test_dry_run_counts_scikit_learns_import_once(trained, tmp_path, capsys, monkeypatch):
    from hypsegcli.batch import SKLEARN_IMPORT_BYTES, SKLEARN_IMPORT_S

    def plan(*extra):
        argv = cluster_argv(trained, tmp_path / "seg", "--cache-dir", tmp_path / "c", "--dry-run")
        code, out, err = run([*argv, *extra], capsys)
        assert code == 0, err
        doc = json.loads(out)
        return doc["estimated_seconds"] - sum(r["seconds"] for r in doc["volumes"]), doc

    monkeypatch.delitem(sys.modules, "sklearn", raising=False)  # as in a fresh process
    # this process's size, the estimates' baseline, is fixed: freed memory would move it
    monkeypatch.setattr(batch, "current_rss_bytes", lambda: 500e6)
    extra, ball = plan()
    assert extra == pytest.approx(0, abs=0.01)  # Poincaré k-means: no scikit-learn
    extra, doc = plan("--metric", "euclidean")
    assert extra == pytest.approx(SKLEARN_IMPORT_S, abs=0.01)
    grew = doc["estimated_peak_bytes"] - ball["estimated_peak_bytes"]
    assert grew == pytest.approx(SKLEARN_IMPORT_BYTES, rel=0.01)
    monkeypatch.setitem(sys.modules, "sklearn", object())  # imported already: nothing to add
    assert plan("--metric", "euclidean")[0] == pytest.approx(0, abs=0.01)
    # after a real run: with its fits cached, or its outputs done, nothing is fitted or imported
    monkeypatch.undo()
    argv = cluster_argv(trained, tmp_path / "seg", "--cache-dir", tmp_path / "c")
    code, _, err = run([*argv, "--metric", "euclidean"], capsys)
    assert code == 0, err
    monkeypatch.delitem(sys.modules, "sklearn", raising=False)
    extra, doc = plan("--metric", "euclidean", "--overwrite")
    assert [r["fits"] for r in doc["volumes"]] == [[]] * 3 and extra == pytest.approx(0, abs=0.01)
    assert doc["estimated_peak_bytes"] < doc["baseline_bytes"] + SKLEARN_IMPORT_BYTES
    extra, doc = plan("--metric", "euclidean")
    assert doc["counts"]["done"] == 3 and extra == pytest.approx(0, abs=0.01)


def test_dry_run_counts_the_silhouette_of_the_restarts(trained, tmp_path, capsys, monkeypatch):
    from hypsegcli.batch import REFERENCE_RATE, SILHOUETTE_DIST_S, SILHOUETTE_S
    from hypsegcli.kmeans import _SILHOUETTE_SAMPLES

    monkeypatch.setattr(batch, "measure_flop_rate", lambda device: REFERENCE_RATE)

    def plan(select):
        argv = cluster_argv(trained, tmp_path / "seg", "--cache-dir", tmp_path / "c")
        code, out, err = run([*argv, "--dry-run", "--n-init", "4", "--select", select], capsys)
        assert code == 0, err
        return json.loads(out)["volumes"]

    for sil, ine in zip(plan("silhouette"), plan("inertia"), strict=True):
        assert sil["fits"] == [2, 3], sil
        points = min(sil["voxels"], _SILHOUETTE_SAMPLES)
        per_fit = (SILHOUETTE_DIST_S + 4 * SILHOUETTE_S) * points**2
        assert sil["seconds"] - ine["seconds"] == pytest.approx(2 * per_fit, abs=2e-3)


def test_embed_parts_skip_existing_and_overwrite(trained, tmp_path, capsys, monkeypatch):
    emb = tmp_path / "emb"
    base = ["embed", trained / "data" / "images", "-m", trained / "model.pt", "-o", emb, "--json"]
    base += ["--patch-size", "9", "--threads", "2"]
    for i in (0, 1):
        code, out, err = run([*base, "--num-parts", "2", "--part-id", str(i)], capsys)
        assert code == 0, err
    assert sorted(p.name for p in emb.glob("*.npy")) == [f"{c}.npy" for c in CASES]
    records = read_manifest(emb / MANIFEST_NAME)
    assert [len(r["inputs"]) for r in records] == [2, 1]
    assert records[0]["inputs"][0]["sha256"] and "embed" in records[0]["inputs"][0]["seconds"]

    def no_read(*args, **kwargs):
        raise AssertionError("volume read although its output exists")

    real_read = pipeline.read_volume
    monkeypatch.setattr(pipeline, "read_volume", no_read)
    code, out, err = run([*base, "--skip-existing"], capsys)
    assert code == 0, err
    assert json.loads(out)["skipped"] == 3
    monkeypatch.setattr(pipeline, "read_volume", real_read)
    calls = []
    real = embedding.embed_volume

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding, "embed_volume", counting)
    code, out, err = run([*base, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(out)["computed"] == 3 and len(calls) == 3


def test_embed_skip_existing_without_output_verifies_the_cache_entry(trained, tmp_path, capsys):
    """Without -o, --skip-existing skips a volume whose cache entry is there: read as
    cluster will read it, so an entry with bytes altered in place (same size) is removed and
    recomputed, not counted as done for every later run to find."""
    cache = tmp_path / "cache"
    image = trained / "data" / "images" / "case_000.nii.gz"
    base = ["embed", image, "-m", trained / "model.pt", "--cache-dir", cache, "--json"]
    base += ["--patch-size", "9", "--threads", "2"]
    code, out, err = run(base, capsys)
    assert code == 0, err
    (entry,) = (cache / "embeddings-v1").glob("*.npy")
    code, out, err = run([*base, "--skip-existing"], capsys)
    assert code == 0 and json.loads(out)["skipped"] == 1, err
    raw = bytearray(entry.read_bytes())
    raw[-5] ^= 1  # one bit of the last voxel's embedding
    entry.write_bytes(bytes(raw))
    code, out, err = run([*base, "--skip-existing"], capsys)
    assert code == 0, err
    assert json.loads(out)["computed"] == 1 and "SHA-256" in err
    code, out, err = run([*base, "--skip-existing"], capsys)
    assert code == 0 and json.loads(out)["skipped"] == 1 and "SHA-256" not in err, err


def test_evaluate_parts_failures_and_manifest(trained, tmp_path, capsys):
    seg = tmp_path / "seg"
    code, _, err = run(cluster_argv(trained, seg), capsys)
    assert code == 0, err
    # a prediction that cannot be scored: wrong shape
    geometry = io.VolumeGeometry.default((5, 5, 5))
    io.write_labels(seg / "case_000_k4.nii.gz", np.zeros((5, 5, 5), np.uint8), geometry)
    truth = trained / "data" / "labels"
    reports = []
    for i in (0, 1):
        code, out, err = run(
            ["evaluate", seg, truth, "--json", "--no-hausdorff", "--csv", tmp_path / "s{part}.csv"]
            + ["--num-parts", "2", "--part-id", str(i), "--level", "2"],
            capsys,
        )
        reports.append((code, json.loads(out), err))
    pairs = sorted(c["pred"] for _, r, _ in reports for c in r["cases"]) + [
        f["volume"] for _, r, _ in reports for f in r["failures"]
    ]
    assert len(pairs) == 7 and len(set(pairs)) == 7  # 3 cases x 2 k + the bad one, split
    assert (tmp_path / "s0.csv").is_file() and (tmp_path / "s1.csv").is_file()
    bad = [(code, r, err) for code, r, err in reports if r["failures"]]
    (code, report, err) = bad[0]
    assert code == 2 and "case_000_k4.nii.gz has shape (5, 5, 5)" in err
    assert read_manifest(tmp_path / MANIFEST_NAME)[-1]["command"] == "evaluate"
    assert len(read_manifest(tmp_path / MANIFEST_NAME)) == 2


def test_manifest_records_a_fatal_error(tmp_path):
    with pytest.raises(HypsegError), batch.RunRecorder(tmp_path, "embed", {"x": 1}):
        raise HypsegError("model vanished")
    (record,) = read_manifest(tmp_path / MANIFEST_NAME)
    assert record["exit_status"] == 1 and record["error"] == "model vanished"


# ----------------------------------------------------------------------------- examples


def _bash(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "HYPSEG": f"{sys.executable} -m hypsegcli",
        "OMP_WAIT_POLICY": "PASSIVE",
        **env,
    }
    return subprocess.run(
        ["bash", str(REPO / "examples" / script), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_example_slurm_array_and_shell_loop(trained, tmp_path):
    common = {
        "HYPSEG_EXAMPLE_DATA": str(trained / "data" / "images"),
        "HYPSEG_EXAMPLE_MODEL": str(trained / "model.pt"),
        "HYPSEG_EXAMPLE_KS": "2 3",
        "HYPSEG_EXAMPLE_PATCH_SIZE": "9",
        "HYPSEG_CACHE_DIR": str(tmp_path / "cache"),
    }
    # two array tasks (--array=1-2) at once, as Slurm would start them
    slurm = {
        **common,
        "HYPSEG_EXAMPLE_OUT": str(tmp_path / "slurm"),
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "1",
    }
    procs = [
        subprocess.Popen(
            ["bash", str(REPO / "examples" / "slurm_cluster.sh")],
            env={
                **os.environ,
                "HYPSEG": f"{sys.executable} -m hypsegcli",
                **slurm,
                "SLURM_ARRAY_TASK_ID": str(task),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for task in (1, 2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    out_dir = tmp_path / "slurm"
    assert sorted(p.name for p in out_dir.glob("*_k*.nii.gz")) == [
        f"{c}_k{k}.nii.gz" for c in CASES for k in (2, 3)
    ]
    assert len(json.loads((out_dir / "centroids.json").read_text())["sets"]) == 6
    records = read_manifest(out_dir / MANIFEST_NAME)
    assert sorted(r["part"]["part_id"] for r in records) == [0, 1]
    assert {r["slurm"]["SLURM_ARRAY_JOB_ID"] for r in records} == {"42"}

    # the shell loop: two parts in parallel into another folder, then again (all skipped)
    loop = {**common, "HYPSEG_EXAMPLE_OUT": str(tmp_path / "loop")}
    loop |= {"HYPSEG_EXAMPLE_PARTS": "2", "HYPSEG_EXAMPLE_LOGS": str(tmp_path / "logs")}
    result = _bash("shell_loop.sh", loop)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "loop").glob("*_k*.nii.gz"))) == 6
    records = read_manifest(tmp_path / "loop" / MANIFEST_NAME)
    assert sorted(r["part"]["part_id"] for r in records) == [0, 1]
    assert all(r["inputs"][0]["status"] == "done" for r in records)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_example_shell_loop_stops_its_parts_and_exits_as_the_signal(tmp_path, sig, code):
    # the parts: an executable under a path with a space, running until they are stopped
    fake = tmp_path / "bin dir" / "hypseg"
    fake.parent.mkdir()
    # (each says it runs: a part signalled between the script's fork and its exec missed it)
    fake.write_text('#!/bin/sh\ntouch "$HYPSEG_EXAMPLE_LOGS/running.$$"\nexec sleep 60\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "HYPSEG": str(fake),
        "HYPSEG_EXAMPLE_PARTS": "2",
        "HYPSEG_EXAMPLE_LOGS": str(tmp_path / "logs"),
        "HYPSEG_EXAMPLE_OUT": str(tmp_path / "out"),
    }
    proc = subprocess.Popen(
        ["bash", str(REPO / "examples" / "shell_loop.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal: a run of the suite started with `&` from a script
        # ignores SIGINT, and bash cannot trap a signal ignored when it starts
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 20
    while len(list((tmp_path / "logs").glob("running.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # both parts run the command
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert err.count("failed (exit 143)") == 2  # each part got SIGTERM


def test_example_walkthrough(tmp_path):
    env = {
        "HYPSEG_EXAMPLE_N": "3",
        "HYPSEG_EXAMPLE_SIZE": "20",
        "HYPSEG_EXAMPLE_SPLIT": "2/0/1",
        "HYPSEG_EXAMPLE_STEPS": "3",
        "HYPSEG_EXAMPLE_TRAIN_OPTS": " ".join(TINY_TRAIN[:-2]),
        "HYPSEG_EXAMPLE_KS": "2 4",
        "HYPSEG_EXAMPLE_PATCH_SIZE": "9",
        "HYPSEG_EXAMPLE_THREADS": "2",
        "HYPSEG_CACHE_DIR": str(tmp_path / "cache"),
    }
    # the command: one executable under a path with a space; the work folder likewise
    wrapper = tmp_path / "bin dir" / "hypseg"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hypsegcli "$@"\n')
    wrapper.chmod(0o755)
    env["HYPSEG"] = str(wrapper)
    work = tmp_path / "w s"
    result = _bash("walkthrough.sh", env, str(work))
    assert result.returncode == 0, result.stderr
    assert (work / "model.pt").is_file()
    assert {p.name for p in (work / "seg").glob("*_k*.nii.gz")} == {
        "case_002_k2.nii.gz",
        "case_002_k4.nii.gz",
    }
    rows = (work / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("case,pred,truth") and len(rows) > 2
    assert "mean Dice" in result.stderr and "est. peak memory" in result.stderr
    (record,) = read_manifest(work / "seg" / MANIFEST_NAME)
    assert record["exit_status"] == 0


def test_long_error_lines_keep_their_reason():
    """Review: per-volume error lines were cut at 400 characters from the start, so after a
    long output path the reason ("No space left on device") was lost."""
    long = "/deep/" + "b" * 600 + "/case_000.centroids.json"
    line = batch.one_line(HypsegError(f"{long}: cannot write (No space left on device)"))
    assert len(line) == 400 and line.startswith("/deep/bbb") and " ... " in line
    assert line.endswith("/case_000.centroids.json: cannot write (No space left on device)")
    assert batch.one_line(OSError("short")) == "OSError: short"
    # review: an absurd --tile gave torch's allocator text with no hint
    torch_text = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
    line = batch.one_line(RuntimeError(torch_text))
    assert line.startswith("out of memory ([enforce fail") and line.endswith(
        "); try a smaller --tile or fewer --threads"
    )
    assert batch.one_line(MemoryError()).startswith("out of memory (MemoryError); try")
