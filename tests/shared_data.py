"""The real data beside the checkout (../shared/data: SST-2, tiny Shakespeare), for unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A file of the shared data. CI's contract includes it: missing under CI=true, the test fails; elsewhere (a
    checkout without it beside) the test is skipped."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"the shared data file {path} is not beside this checkout"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
