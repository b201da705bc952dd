"""float64 mirrors of the matrix-free attention products A·X and Aᵀ·Y.

Mirrors, not oracles: each follows its kernel in `nkattn.cuda_kernels.lowrank_ops`
operation by operation (tile order, chunked dot products, one rounding per step,
the portable exp), so the float64 kernels reproduce them to the bit. The dense
oracle of these products (A built in float64 and multiplied) lives with the
randomized SVD references in `nkattn.reference.lowrank`; the semantics (masks,
GQA, empty rows) are `nkattn.reference.exact`'s.

* `attention_times_ref(q, k, x)` is `streaming_attention_ref` with x as the
  values: the A·X kernel is the exact kernel at value width l.
* `attention_transpose_times_ref(q, k, y, lse)` walks the query tiles of
  ``order.block_n`` rows in increasing order and, for every key j,
  ``s = q_i·k_j`` (the exact kernel's chunked dot), ``x = s·scale + (-lse_i)``,
  ``p = exp(x)`` (0 where row i does not see key j), ``out_j += p·y_i`` row by
  row. Tiles the kernel skips for a block of keys add exact zeros here.

Equivalent NumPy for one (b, h) with no mask (A the dense attention matrix)::

    out = A.T @ y        # A[i, j] = exp(scale * q[i] @ k[j] - lse[i])
"""

from __future__ import annotations

import numpy as np

from nkattn.reference.exact import (
    _expand_kv_heads,
    default_scale,
    exp_nonpositive,
    streaming_attention_ref,
    streaming_order,
    visible_key_counts,
)


def attention_times_ref(q, k, x, *, causal=False, scale=None, key_lengths=None, order=None):
    """Mirror of `attention_times`: (A·X, lse) in float64, in the exact kernel's order."""
    return streaming_attention_ref(q, k, x, causal=causal, scale=scale, key_lengths=key_lengths, order=order)


def attention_transpose_times_ref(q, k, y, lse, *, causal=False, scale=None, key_lengths=None, order=None, keys=None):
    """Mirror of `attention_transpose_times`: Aᵀ·Y per query head, (B, H, Nk, l) float64.

    `order` defaults to ``streaming_order(float64, d)``, the float64 kernel's;
    only its ``block_n`` (rows per query tile) and ``dot_chunk`` matter. `keys`
    (indices into Nk, default all) returns only those keys' rows: a key's bits
    depend on nothing else, so large problems can be checked on a sample.
    """
    q = np.asarray(q, dtype=np.float64)
    k = _expand_kv_heads(np.asarray(k, dtype=np.float64), q.shape[1])
    y = np.asarray(y, dtype=np.float64)
    lse = np.asarray(lse, dtype=np.float64)
    batch, heads, nq, head_dim = q.shape
    nk, width = k.shape[2], y.shape[3]
    scale = default_scale(head_dim) if scale is None else float(scale)
    order = streaming_order(np.float64, head_dim) if order is None else order
    bn, chunk = order.block_n, order.dot_chunk
    key_idx = np.arange(nk) if keys is None else np.asarray(keys)
    k = k[:, :, key_idx]

    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)  # (B, Nq)
    acc = np.zeros((batch, heads, len(key_idx), width))
    with np.errstate(invalid="ignore", over="ignore"):
        for tile_start in range(0, nq, bn):
            # the tile, zero-padded past Nq like the kernel's shared-memory copy; padding rows see no key
            rows = slice(tile_start, min(tile_start + bn, nq))
            n_rows = rows.stop - rows.start
            q_tile = np.zeros((batch, heads, bn, head_dim))
            y_tile = np.zeros((batch, heads, bn, width))
            lse_tile = np.zeros((batch, heads, bn))
            count_tile = np.zeros((batch, bn), dtype=np.int64)
            q_tile[:, :, :n_rows] = q[:, :, rows]
            y_tile[:, :, :n_rows] = y[:, :, rows]
            lse_tile[:, :, :n_rows] = lse[:, :, rows]
            count_tile[:, :n_rows] = counts[:, rows]

            # scores (keys x rows): the chunked dot over d, then scale and lse
            dot = None
            for c0 in range(0, head_dim, chunk):
                part = k[:, :, :, None, c0] * q_tile[:, :, None, :, c0]
                for c in range(c0 + 1, c0 + chunk):
                    part = part + k[:, :, :, None, c] * q_tile[:, :, None, :, c]
                dot = part if dot is None else dot + part
            x = dot * scale + (-lse_tile[:, :, None, :])
            visible = key_idx[None, None, :, None] < count_tile[:, None, None, :]
            p = exp_nonpositive(np.where(visible, x, -np.inf))

            for i in range(bn):
                acc = acc + p[..., i, None] * y_tile[:, :, None, i, :]
    return acc
