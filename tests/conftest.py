"""Test set-up: use the CUDA simulator when this machine has no GPU.

Must run before numba is imported (numba reads NUMBA_ENABLE_CUDASIM once).
"""

from nkattn.cli import _choose_simulator

SIMULATOR = _choose_simulator()

import pytest  # noqa: E402
from numba import cuda  # noqa: E402

REAL_GPU = (not SIMULATOR) and cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if REAL_GPU:
        return
    reason = "needs a real CUDA GPU (simulator on or no GPU): run on the device machine"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
