"""The library tests' setup (offline Hub, the shared data directory, the `one_thread` and `run_store`
fixtures) for the benchmarks' tests."""
from tests.conftest import one_thread, run_store  # noqa: F401
