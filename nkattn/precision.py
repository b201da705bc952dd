"""The analyzers of precision="auto" on the GPU, at O(N) memory.

`device_head_stats` returns the head statistics that `nkattn.reference.precision.head_stats`
computes from dense float64 scores, from one streaming pass over the scores in the input
dtype and the block absmaxes of q, k and v (`nkattn.cuda_kernels.precision`). Per row the
kernel gives the lse, the entropy and the largest and smallest scaled visible score; on the
host, in float64 from those B·H·Nq values (fewer when sampled, below), they become the
reference's row analyzers (spread = max s - lse, max |s| = max(max s, -min s), NaN for a
row with no key) and go through the reference's own aggregation, so the statistics mean
what they mean there.

Past `MAX_ANALYZED_ROWS` query rows per head the row analyzers run on a strided sample
(`default_row_stride`): head statistics are then means and maxima over the sampled rows,
so ``max_abs_score`` and ``max_p`` are sample maxima (at most the head's). The block
absmaxes of q, k and v always read every row.

Two statistics are left out: ``min_abs_score`` (the smallest nonzero |s| of a row needs
every score where a row's scores change sign, not its extremes) and ``dynamic_range``,
which is built from it. Only seed 001's rule (`adaattn_rule`) reads them; the predictor of
'auto' does not (`nkattn.reference.precision.FEATURES`).
"""

from __future__ import annotations

import numpy as np

from nkattn import arrays
from nkattn.reference.exact import visible_key_counts
from nkattn.reference.precision import BLOCK_N, Analysis, head_stats

NOT_MEASURED = ("min_abs_score", "dynamic_range")

# the row pass is FFMA work of rows x Nk x d per head, about half an fp32 attention when every
# row is analyzed, i.e. several tensor-core attentions: capped, its share of an attention of Nq
# rows falls as 1024 / Nq, while 1024 rows still average a head's statistics over many rows
MAX_ANALYZED_ROWS = 1024


def default_row_stride(nq: int) -> int:
    """Every row up to `MAX_ANALYZED_ROWS`, else every ``ceil(Nq / MAX_ANALYZED_ROWS)``-th, so
    at most `MAX_ANALYZED_ROWS` rows are analyzed."""
    return max(1, -(-nq // MAX_ANALYZED_ROWS))


def _on_device(x):
    from numba import cuda

    return arrays.numba_view(x) if arrays.is_device_array(x) else cuda.to_device(np.ascontiguousarray(x))


def device_head_stats(q, k, v, key_lengths=None, *, causal: bool, scale: float, block_m: int = 128,
                      block_n: int = BLOCK_N, row_stride: int | None = None) -> dict[str, np.ndarray]:
    """`head_stats` (arrays (B, H), float64) but `NOT_MEASURED`, from the GPU analyzers.

    The row analyzers see query rows ``0, s, 2s, ...`` with s = `row_stride`, by default
    `default_row_stride(Nq)`: that bounds the row pass at ~ `MAX_ANALYZED_ROWS` x Nk scores per
    head. So few rows make few blocks; the pass splits their keys over more blocks by
    `row_analyzers`' default (`nkattn.cuda_kernels.precision.default_key_splits`), which sets
    the rounding of the statistics, not what they are. Each sampled row sees the keys it sees in
    the full attention; the statistics are those of `head_stats` on the sampled rows
    (``max_abs_score`` and ``max_p`` their maxima).

    q, k, v: float32 or float64 device arrays of any framework (read in place) or NumPy arrays
    (copied to the device), shaped as for `nkattn.attention`, d a kernel head dim
    (`nkattn.reference.exact.KERNEL_HEAD_DIMS`); `key_lengths`: int (B,) on the host or None.
    Inputs are assumed validated and finite (`nkattn.attention` checks them).
    """
    from numba import cuda

    from nkattn.cuda_kernels.precision import block_absmax, row_analyzers

    q, k, v = (_on_device(x) for x in (q, k, v))
    batch, _, nq, head_dim = q.shape
    nk = k.shape[2]
    lengths = np.full(batch, nk, np.int32) if key_lengths is None else np.asarray(key_lengths, dtype=np.int32)
    key_lengths_dev = cuda.to_device(lengths)
    row_stride = default_row_stride(nq) if row_stride is None else row_stride
    lse, entropy, s_max, s_min = (x.copy_to_host().astype(np.float64)
                                  for x in row_analyzers(q, k, key_lengths_dev, causal=causal, scale=scale,
                                                         row_stride=row_stride))
    q_abs = block_absmax(q, cuda.to_device(np.full(batch, nq, np.int32)), block_m)
    k_abs, v_abs = (block_absmax(x, key_lengths_dev, block_n) for x in (k, v))

    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)[:, ::row_stride]
    empty = np.broadcast_to((counts == 0)[:, None, :], lse.shape)
    with np.errstate(invalid="ignore"):  # -inf - -inf in rows with no key, replaced by NaN
        spread = np.where(empty, np.nan, s_max - lse)
    analysis = Analysis(
        entropy=np.where(empty, np.nan, entropy),
        spread=spread,
        max_abs_score=np.where(empty, np.nan, np.maximum(s_max, -s_min)),
        min_abs_score=np.full(lse.shape, np.nan),
        visible=counts,
        q_absmax=q_abs.copy_to_host().astype(np.float64),
        k_absmax=k_abs.copy_to_host().astype(np.float64),
        v_absmax=v_abs.copy_to_host().astype(np.float64),
        scale=float(scale), head_dim=head_dim, block_m=block_m, block_n=block_n,
    )
    stats = head_stats(analysis)
    for name in NOT_MEASURED:
        del stats[name]
    return stats
