"""Fixtures shared across the test packages."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread and restore the count afterwards. On a shared, busy 2-core CPU several
    threads are many times slower than one for tiny models (measured: 0.08 s against 0.3-3 s per tiny LM
    training step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
