"""nkattn: a Numba kernel lab for transformer attention.

    import nkattn
    out = nkattn.attention(q, k, v, causal=True)

`nkattn.methods` is the registry of methods and their backends,
`nkattn.reference` holds the NumPy float64 references, `nkattn.cuda_kernels`
the numba.cuda kernels and `nkattn.studies` the experiments that write results/.
"""

import numpy as _np

# numba-cuda 0.30.x still calls np.row_stack at its first kernel launch; NumPy 2.5
# removed it (numba-cuda is in maintenance mode and will not change). Alias it
# before anything imports numba.cuda.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack

__version__ = "0.1.0"

from nkattn.api import FallbackWarning, attention, backend_status

__all__ = ["FallbackWarning", "__version__", "attention", "backend_status"]
