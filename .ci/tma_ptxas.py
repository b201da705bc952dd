"""Does the TMA inline PTX assemble? The TMA tile test's kernel (`tests/test_tma.py`) compiled by numba
for sm_90a, its TMA statements printed, then ``ptxas -v`` (the CUDA toolkit's, on PATH). No GPU needed.

    python3 .ci/tma_ptxas.py
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # compile_ptx needs the real target
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the kernel lives in the tests package

from numba import cuda, from_dtype, types  # noqa: E402

from tests.test_tma import BITS, tma_tile_kernel  # noqa: E402

TMA_STATEMENTS = ("fence.proxy.tensormap", "mbarrier.arrive.expect_tx", "cp.async.bulk.tensor")

for rows, cols, element_bytes in ((128, 128, 2), (64, 256, 2), (16, 32, 4)):
    kernel, _, _ = tma_tile_kernel(rows, cols, element_bytes)
    bits = types.Array(from_dtype(BITS[element_bytes]), 1, "C")
    signature = (types.Array(types.uint64, 1, "C"), types.Array(bits.dtype, 4, "C"), types.int64, bits, bits)
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0, "a"))
    print(f"{rows} x {cols} x {element_bytes} B tile:")
    for line in ptx.splitlines():
        if line.startswith((".version", ".target")) or any(s in line for s in TMA_STATEMENTS):
            print("  " + line.strip())
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run(["ptxas", "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    print(f"  ptxas exit {run.returncode}")
    for line in (run.stdout + run.stderr).splitlines():
        if "Compiling entry" not in line and "Function properties" not in line:
            print("  " + line.strip())
