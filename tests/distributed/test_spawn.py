"""The launcher itself: a failing rank fails the test with that rank's traceback."""

import pytest

from tests.distributed._spawn import run_on_ranks


def _fails_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("deliberate failure")


def test_a_failing_rank_fails_the_run():
    with pytest.raises(AssertionError, match="(?s)rank 1.*deliberate failure"):
        run_on_ranks(_fails_on_rank_one, world=2, timeout=30)
