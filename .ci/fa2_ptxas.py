"""Registers and spills of the mma.sync kernel, without a GPU: PTX for sm_80 (or the
compute capabilities given) from numba, then ``ptxas -v`` (the CUDA toolkit's, on PATH).

    python3 .ci/fa2_ptxas.py                  # f16 and bf16, d = dv = 64, 128, 256, sm_80
    FA2_CC=80,86,90 FA2_D=128 python3 .ci/fa2_ptxas.py
"""
import os
import re
import subprocess
import tempfile

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # compile_ptx needs the real target

from numba import cuda, types

from nkattn.cuda_kernels.exact_tc import mma_sync_config, tc_attention_kernel

CCS = [int(c) for c in os.environ.get("FA2_CC", "80").split(",")]
DIMS = [int(d) for d in os.environ.get("FA2_D", "64,128,256").split(",")]
KINDS = os.environ.get("FA2_KINDS", "f16,bf16").split(",")
half4 = types.Array(types.uint16, 4, "C")
signature = (half4, half4, half4, types.Array(types.int32, 1, "C"), half4, types.Array(types.float32, 3, "C"),
             types.float32, types.boolean, types.int64)
for kind in KINDS:
    for d in DIMS:
        config = mma_sync_config(d, d)
        kernel, shared_bytes = tc_attention_kernel(kind, d, d, config)
        for cc in CCS:
            ptx_text, _ = cuda.compile_ptx(kernel.py_func, signature, cc=divmod(cc, 10))
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(ptx_text)
                f.flush()
                arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
                run = subprocess.run(["ptxas", f"-arch={arch}", "--maxrregcount=255", "-v", f.name, "-o", os.devnull],
                                     capture_output=True, text=True, check=True)
            info = " ".join(re.findall(r"(Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads|"
                                       r"\d+ bytes stack frame)", run.stderr))
            print(f"{kind} d={d} BM={config.block_m} BN={config.block_n} smem={shared_bytes} sm_{cc}: {info}", flush=True)
