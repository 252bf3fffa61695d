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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after: on a small shared machine two threads spin at OpenMP
    barriers (tiny models 10-100x slower), and a fixed thread count keeps results repeatable (1 and 2 threads
    differ in the last bits from the split of the reductions)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
