"""Where the tests find the real data of ``../shared/data`` (relative to the repository root).

A fresh clone has no ``../shared``: tests that need it skip cleanly. ``ISLE_SHARED_DATA`` points
elsewhere (e.g. from a git worktree that does not sit next to ``shared/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("ISLE_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def shared_data(*parts: str) -> Path:
    """``SHARED_DATA / parts``, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (../shared/data next to the repository, "
                    "or ISLE_SHARED_DATA)")
    return path
