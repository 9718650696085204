"""Eval tests run tiny models: one intra-op thread is much faster than two on a shared 2-core machine."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder runs on one thread (tests/conftest.py's ``one_thread``)."""
