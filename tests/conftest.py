import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# Hypothesis profiles (tests/strategies.py's ``budget`` sizes each property test by the active one; docs/testing.md):
# "ci" (default): a bounded number of examples, derandomized (the same examples on every run), no database;
# "fuzz" (HYPOTHESIS_PROFILE=fuzz): random examples, >= 10,000 over the op-level and model-level properties.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=20, derandomize=True, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("fuzz", max_examples=10_000, derandomize=False, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _close_worker_pools():
    """The multi-process tests' worker pools end with the session (atexit does not run in xdist workers, which
    left 4 spawned workers of ~600 MB each running after pytest exited)."""
    yield
    import parallel_harness as testing

    testing.close_shared()


@pytest.fixture
def pool2():
    """The gloo worker pool of 2 processes shared by every test of the session (``parallel_harness``)."""
    import parallel_harness

    return parallel_harness.shared_pool(2)


@pytest.fixture
def pool4():
    import parallel_harness

    return parallel_harness.shared_pool(4)
