"""Where the golden outputs of the official code live (../shared/golden; README of that folder: every key).

`golden_path(name)`: the file, or the test skips with a message naming the folder -- and fails when the
environment variable CI is set (CI has the folder, so a missing one there is a broken setup, not a skip).
ZOO_GOLDEN overrides the folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    if os.environ.get("ZOO_GOLDEN"):
        return Path(os.environ["ZOO_GOLDEN"])
    for cand in (REPO.parent / "shared" / "golden", REPO / "shared" / "golden"):
        if cand.is_dir():
            return cand
    return REPO.parent / "shared" / "golden"


def golden_path(name: str) -> Path:
    p = golden_dir() / name
    if not p.is_file():
        msg = (f"golden file {p} not found: the official code's reference outputs live in {golden_dir()} "
               "(set ZOO_GOLDEN to the folder)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


def golden_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(golden_path(name)) as z:
        return {k: z[k] for k in z.files}
