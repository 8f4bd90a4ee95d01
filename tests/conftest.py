import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


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
