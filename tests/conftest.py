"""Shared fixtures: small real shards, a directory per test module for its scenarios. Helpers that
tests call live in tests/helpers/; tests under tests/e2e/ are marked e2e (`pytest -m "not e2e"`
runs tests/unit/ and tests/integration/), those under tests/integration/ integration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# gcsfs reads this once, when it is first imported (gcsfs/__init__.py), by whichever test that is: the
# GCS tests' server serves the JSON API only (tests/helpers/storage.py, FakeGcs)
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request) -> Path:
    """A directory shared by one test module's scenario fixtures (their runs and MLflow store)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="session")
def fm_shards(tmp_path_factory) -> Path:
    """2,048 train + 512 val real Fashion-MNIST images in 8 + 4 shards."""
    from ffscale.data.ingest import sources as shards
    from ffscale.data.ingest.writer import write_shards

    out = tmp_path_factory.mktemp("fm")
    for split, n, size in (("train", 2048, 256), ("val", 512, 128)):
        write_shards(shards.fashion_mnist(split), out / split, split, shard_size=size, limit=n)
    return out


@pytest.fixture(scope="session")
def foreign(tmp_path_factory) -> Path:
    """Another tool's shards in one directory, each split indexed on its own (helpers/foreign.py)."""
    from helpers.foreign import make_foreign

    return make_foreign(tmp_path_factory.mktemp("foreign"))


# The e2e modules with the most launches, longest first. scripts/test.sh runs the suite on two workers,
# each taking whole files in collection order (pytest-xdist --dist loadfile --no-loadscope-reorder):
# the longest start first so that no long one is left to run alone at the end.
LONGEST_FIRST = ("test_faults", "test_train", "test_mlflow_server", "test_faults_numeric", "test_bf16",
                 "test_nodes", "test_readme", "test_distill_train", "test_integrity_jobs", "test_remote_train")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    e2e = Path(__file__).parent / "e2e"

    def weight(item) -> tuple[int, int]:
        name = Path(item.fspath).stem
        heavy = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return (heavy, 0 if Path(item.fspath).is_relative_to(e2e) else 1)

    integration = Path(__file__).parent / "integration"
    for item in items:
        if Path(item.fspath).is_relative_to(e2e):
            item.add_marker(pytest.mark.e2e)
        elif Path(item.fspath).is_relative_to(integration):
            item.add_marker(pytest.mark.integration)
    items.sort(key=weight)  # stable: a module's tests keep their order
