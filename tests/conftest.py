"""Shared fixtures: tests make their own data in tmp_path."""

from __future__ import annotations

import os

import pytest

# Keep the tests' torch to the two cores of the CI machine and deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """One tiny trained pipeline (clitools.tiny_pipeline, 4 steps) for modules that only read it."""
    from clitools import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("tiny"), steps=4)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real cache directory from a test."""
    monkeypatch.setenv("HYPSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _outside_job_arrays(monkeypatch):
    """Run as if not in a Slurm job array or torchrun job, even when the suite itself is."""
    from hypsegcli.batch import SLURM_VARIABLES

    for name in (*SLURM_VARIABLES, "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Each test starts from the same global torch and numpy RNG state, whatever ran
    before it (time-budgeted training draws a varying number of numbers)."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
