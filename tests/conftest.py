"""Test set-up: use the CUDA simulator when this machine has no GPU.

Must run before numba is imported (numba reads NUMBA_ENABLE_CUDASIM once).
"""

from nkattn.cli import _choose_simulator

SIMULATOR = _choose_simulator()

import pytest  # noqa: E402
from numba import cuda  # noqa: E402

from nkattn.testing import assert_within_budget, float32_floor, relative_error  # noqa: E402

REAL_GPU = (not SIMULATOR) and cuda.is_available()


def check_float32(name, got, ref64, naive):
    """The float32 error budget on a GPU; the simulator does float32 math as NumPy
    scalars without FMA, so there it only catches indexing bugs (STYLE: no float32
    precision claims from the simulator)."""
    if SIMULATOR:
        assert relative_error(got, ref64) <= 1e-3, name
    else:
        assert_within_budget(name, got, ref64, naive, floor=float32_floor(ref64))


def pytest_collection_modifyitems(config, items):
    if REAL_GPU:
        return
    reason = "needs a real CUDA GPU (simulator on or no GPU): run on the device machine"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
