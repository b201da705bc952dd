"""One call each of the wgmma kernel, SDPA flash and cuDNN at N = 16K, d = 64 and 128, fp16: results/bench/ncu-dram-h100.txt came from

    ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        python3 .ci/ncu_dram_workload.py
"""
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

import nkattn  # noqa: F401
from nkattn import arrays
from nkattn.cuda_kernels.exact_tc import tc_attention

n = 16384
for d in (64, 128):
    q, k, v = (torch.randn(1, 8, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    qd, kd, vd = (arrays.kernel_view(x, np.dtype(np.float16)) for x in (q, k, v))
    tc_attention(qd, kd, vd, cuda.to_device(np.full(1, n, np.int32)), causal=False, scale=d ** -0.5, kind="f16")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.cuda.synchronize()
