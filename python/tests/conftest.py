"""Shared fixtures: the muscle CLI binary (MUSCLE_BIN, else target/release/muscle when built) for
the tests that hold the package against the command line."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def muscle_bin():
    path = os.environ.get("MUSCLE_BIN") or str(ROOT / "target" / "release" / "muscle")
    if not os.path.isfile(path):
        pytest.skip(f"no muscle binary at {path} (set MUSCLE_BIN)")
    return path
