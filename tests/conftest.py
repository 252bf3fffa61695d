"""Shared test setup: offline Hub, local data directory (../shared/data when present)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "VITREPRO_DATA" not in os.environ and _shared.is_dir():
    os.environ["VITREPRO_DATA"] = str(_shared)


@pytest.fixture
def run_store(tmp_path):
    """An empty run store in a temporary folder."""
    from vitrepro.store import RunStore
    return RunStore(tmp_path / "runs")
