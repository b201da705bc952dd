"""Engine of the LSH recall study: SimHash codes, exact candidate sets of many
configurations in one pass, per-query retrieval metrics, and SimHash theory.

`evaluate` classifies every (query, key) pair once and accumulates, per query, the
statistics of the candidates of every configuration (bits, tables) with planes
``planes[:tables, :bits]``; `aggregate` turns them into means over queries.
Definitions are in `nkattn.studies.lsh_recall`'s docstring; everything here is
deterministic (candidate fractions are exact: nothing is sampled).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from nkattn.reference.lsh import MAX_BITS, collision_probability, hyperplanes
from nkattn.results import round_sig
from nkattn.studies.lsh_data import needle_geometry, planted

KS = (1, 10, 50)
# a pair's agreement level is 0..MAX_BITS: the number of leading planes its codes share
LEVELS = MAX_BITS + 1

# --------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------

# trailing zeros of a code XOR (MAX_BITS for 0): the number of leading planes on which two codes agree
TZ_LUT = np.array([MAX_BITS] + [(i & -i).bit_length() - 1 for i in range(1, 1 << MAX_BITS)], dtype=np.uint8)


def hash_codes(x, planes, *, chunk: int = 1 << 15) -> np.ndarray:
    """SimHash codes of the rows of x, (N, tables) uint16: ``simhash(x, planes).T``.

    Same semantics as `nkattn.reference.lsh.simhash` (float64 projections, bit i
    set when x . r_{t,i} > 0) with a BLAS product, chunked over rows. The codes of
    ``planes[:tables, :bits]`` are ``hash_codes(x, planes)[:, :tables] & (2**bits - 1)``.
    """
    planes = np.asarray(planes, dtype=np.float64)
    tables, bits, d = planes.shape
    if bits > MAX_BITS:
        raise ValueError(f"at most {MAX_BITS} bits, got {bits}")
    flat = planes.reshape(tables * bits, d).T
    weights = (2.0 ** np.arange(bits)).astype(np.float32)
    x = np.asarray(x)
    out = np.empty((x.shape[0], tables), dtype=np.uint16)
    for start in range(0, x.shape[0], chunk):
        proj = np.asarray(x[start : start + chunk], dtype=np.float64) @ flat
        bits_set = (proj > 0).reshape(-1, tables, bits).astype(np.float32)
        out[start : start + chunk] = (bits_set @ weights).astype(np.uint16)  # exact: sums < 2^16
    return out


def agreement_levels(q_codes, k_codes, table_counts) -> np.ndarray:
    """For code pairs (..., tables) uint16: (..., len(table_counts)) uint8 levels.

    Level for T tables = max over the first T tables of the number of leading
    planes on which the two codes agree. The pair collides in configuration
    (bits, T) iff its level for T is >= bits.
    """
    agree = TZ_LUT[np.bitwise_xor(q_codes, k_codes)]
    return np.maximum.accumulate(agree, axis=-1)[..., np.asarray(table_counts) - 1]


@numba.njit(parallel=True, cache=True)
def _accumulate(s, row_max, q_codes, k_codes, v, table_counts, min_level, lut, acc_s, acc_v, block, groups):
    """Per query and level: count, sum s, sum e, sum e^2 (acc_s) and sum e v (acc_v, levels >= min_level).

    s (nq, N) float32 scaled scores, e = exp(s - row_max); q_codes (nq, T), k_codes (N, T)
    uint16; table_counts ascending with table_counts[-1] == T; acc_s (nq, ncut, LEVELS, 4),
    acc_v (nq, ncut, LEVELS - min_level, dv) float64. The queries are split into `groups`
    (one per thread, no barrier inside); each group walks the keys in blocks and runs
    its queries over a block while the block's v rows are in cache.
    """
    nq, n = s.shape
    ntab = q_codes.shape[1]
    ncut = table_counts.shape[0]
    dv = v.shape[1]
    per = (nq + groups - 1) // groups
    for g in numba.prange(groups):
        lev = np.empty(ncut, np.int64)
        q0 = g * per
        q1 = min(q0 + per, nq)
        for start in range(0, n, block):
            stop = min(start + block, n)
            for qi in range(q0, q1):
                for j in range(start, stop):
                    sj = np.float64(s[qi, j])
                    e = math.exp(sj - row_max[qi])
                    m = 0
                    c = 0
                    for t in range(ntab):
                        z = lut[k_codes[j, t] ^ q_codes[qi, t]]
                        m = max(m, z)
                        if t + 1 == table_counts[c]:
                            lev[c] = m
                            c += 1
                    for c in range(ncut):
                        lv = lev[c]
                        acc_s[qi, c, lv, 0] += 1.0
                        acc_s[qi, c, lv, 1] += sj
                        acc_s[qi, c, lv, 2] += e
                        acc_s[qi, c, lv, 3] += e * e
                        if lv >= min_level:
                            for x in range(dv):
                                acc_v[qi, c, lv - min_level, x] += e * v[j, x]


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def evaluate(
    queries,
    keys,
    planes,
    *,
    bits=None,
    tables=None,
    needles=None,
    extra_needles=None,
    ks=KS,
    scale=None,
    values=None,
    chunk=None,
    block=2048,
) -> dict:
    """Per-query metrics of every configuration (bits, tables) with planes[:tables, :bits].

    Returns arrays indexed [tables_index, bits_index, query] (definitions in
    `nkattn.studies.lsh_recall`'s docstring) plus per-query ``topk_cos``/``topk_levels`` for
    binning. ``extra_needles`` maps a cosine to needle vectors (nq, d) whose
    collision with their query is measured as ``needle_hit_<cos>``.
    """
    from threadpoolctl import threadpool_limits

    # BLAS threads spinning beside numba's threads oversubscribe the cores (3-4x slower on 2 cores)
    with threadpool_limits(1, user_api="blas"):
        return _evaluate(
            queries,
            keys,
            planes,
            bits=bits,
            tables=tables,
            needles=needles,
            extra_needles=extra_needles,
            ks=ks,
            scale=scale,
            values=values,
            chunk=chunk,
            block=block,
        )


def _evaluate(queries, keys, planes, *, bits, tables, needles, extra_needles, ks, scale, values, chunk, block):
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    planes = np.asarray(planes, dtype=np.float64)
    tmax, bmax, d = planes.shape
    bits = tuple(bits or (bmax,))
    tables = tuple(tables or (tmax,))
    if max(bits) > bmax or max(tables) > tmax or list(tables) != sorted(set(tables)):
        raise ValueError(f"bits {bits} / tables {tables} (ascending) must fit planes of shape {planes.shape}")
    nq, n = len(queries), len(keys)
    ks = tuple(k for k in ks if k <= n)
    kmax = max(ks)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    chunk = chunk or max(1, min(64, (1 << 24) // n))
    ncut, nb = len(tables), len(bits)
    min_level = min(bits)
    planes = planes[: max(tables)]
    tcuts = np.asarray(tables, dtype=np.int64)
    bits_arr = np.asarray(bits)

    k_codes = hash_codes(keys, planes)
    q_codes = hash_codes(queries, planes)
    key_norms = np.linalg.norm(keys.astype(np.float64), axis=1)
    v = None if values is None else np.ascontiguousarray(values, dtype=np.float32)
    v_kernel = np.zeros((n, 0), np.float32) if v is None else v

    count = np.zeros((ncut, nb, nq))
    sum_s = np.zeros((ncut, nb, nq))
    out_err = np.full((ncut, nb, nq), np.nan)
    mean_r, std_r = np.zeros(nq), np.zeros(nq)
    topk_cos = np.zeros((nq, kmax))
    topk_levels = np.zeros((nq, kmax, ncut), np.uint8)
    for lo in range(0, nq, chunk):
        hi = min(lo + chunk, nq)
        dots = queries[lo:hi] @ keys.T  # (c, N) float32
        s = dots * np.float32(scale)
        mean_r[lo:hi] = s.mean(axis=1, dtype=np.float64)
        std_r[lo:hi] = s.std(axis=1, dtype=np.float64)
        top = np.argpartition(dots, n - kmax, axis=1)[:, n - kmax :]
        order = np.argsort(-np.take_along_axis(dots, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        qn = np.linalg.norm(queries[lo:hi].astype(np.float64), axis=1)
        topk_cos[lo:hi] = np.take_along_axis(dots, top, axis=1) / (qn[:, None] * key_norms[top])
        topk_levels[lo:hi] = agreement_levels(q_codes[lo:hi, None, :], k_codes[top], tables)
        row_max = s.max(axis=1).astype(np.float64)
        acc_s = np.zeros((hi - lo, ncut, LEVELS, 4))
        acc_v = np.zeros((hi - lo, ncut, LEVELS - min_level, v_kernel.shape[1]))
        _accumulate(
            s,
            row_max,
            q_codes[lo:hi],
            k_codes,
            v_kernel,
            tcuts,
            min_level,
            TZ_LUT,
            acc_s,
            acc_v,
            block,
            min(numba.get_num_threads(), hi - lo),
        )
        # candidates of (bits b, tables T): levels >= b
        tail_s = np.cumsum(acc_s[:, :, ::-1], axis=2)[:, :, ::-1]  # sums over levels >= l
        sel = tail_s[:, :, bits_arr]  # (c, ncut, nb, 4)
        count[:, :, lo:hi] = sel[..., 0].transpose(1, 2, 0)
        sum_s[:, :, lo:hi] = sel[..., 1].transpose(1, 2, 0)
        if v is not None:
            e = np.exp(s - row_max[:, None].astype(np.float32))
            exact = (e @ v) / e.sum(axis=1, dtype=np.float64)[:, None]
            tail_v = np.cumsum(acc_v[:, :, ::-1], axis=2)[:, :, ::-1][:, :, bits_arr - min_level]  # (c, ncut, nb, dv)
            z = sel[..., 2][..., None]
            approx = np.divide(tail_v, z, out=np.zeros_like(tail_v), where=z > 0)
            err = (
                np.linalg.norm(approx - exact[:, None, None, :], axis=-1)
                / np.linalg.norm(exact, axis=-1)[:, None, None]
            )
            out_err[:, :, lo:hi] = err.transpose(1, 2, 0)
        del dots, s

    res = {
        "bits": bits,
        "tables": tables,
        "ks": ks,
        "n_keys": n,
        "n_queries": nq,
        "d": d,
        "count": count,
        "candidate_fraction": count / n,
        "mean_random": mean_r,
        "std_random": std_r,
        "topk_cos": topk_cos,
        "topk_levels": topk_levels,
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = sum_s / count
        res["amplification"] = (mean_c - mean_r) / std_r
        res["amplification_seed"] = mean_c / mean_r
    res["mean_candidate"] = mean_c
    if v is not None:
        res["output_rel_error"] = out_err
    b_ = bits_arr[None, :, None, None]
    hit = topk_levels.transpose(2, 0, 1)[:, None, :, :] >= b_  # (ncut, nb, nq, kmax)
    theory = collision_grid(topk_cos, bits, tables)  # (ncut, nb, nq, kmax)
    for k in ks:
        res[f"recall_at_{k}"] = hit[..., :k].mean(axis=-1)
        res[f"theory_recall_at_{k}"] = theory[..., :k].mean(axis=-1)
    if needles is not None:
        needles = np.asarray(needles)
        res["needle_hit"] = _collide(q_codes, k_codes[needles], bits, tables)
        res["needle_cos"] = (queries.astype(np.float64) * keys[needles]).sum(1) / (
            np.linalg.norm(queries.astype(np.float64), axis=1) * key_norms[needles]
        )
    for cos, vecs in (extra_needles or {}).items():
        res[f"needle_hit_{cos}"] = _collide(q_codes, hash_codes(vecs, planes), bits, tables)
    return res


def collision_grid(cos, bits, tables):
    """collision_probability for every (tables, bits) at once: (len(tables), len(bits), *cos.shape)."""
    theta = np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0))
    agree = 1.0 - theta / np.pi
    return np.stack([np.stack([1.0 - (1.0 - agree**b) ** t for b in bits]) for t in tables])


def _collide(q_codes, k_codes, bits, tables):
    """(ncut, nb, n) bool: row i of q_codes collides with row i of k_codes in configuration (b, T)."""
    lev = agreement_levels(q_codes, k_codes, tables)  # (n, ncut)
    return lev.T[:, None, :] >= np.asarray(bits)[None, :, None]


PER_QUERY = ("candidate_fraction", "amplification", "amplification_seed", "output_rel_error") + tuple(
    f"recall_at_{k}" for k in KS
)


def aggregate(res: dict, ti: int, bi: int) -> dict:
    """Mean and standard deviation over queries of configuration (tables[ti], bits[bi])."""
    out = {"n_queries": res["n_queries"]}
    empty = res["count"][ti, bi] == 0
    out["empty_fraction"] = float(empty.mean())
    for name in PER_QUERY:
        if name not in res:
            continue
        x = res[name][ti, bi]
        finite = np.isfinite(x)
        out[name] = float(x[finite].mean()) if finite.any() else float("nan")
        out[name + "_std"] = float(x[finite].std()) if finite.any() else float("nan")
    if "needle_hit" in res:
        hits = res["needle_hit"][ti, bi]
        out["needle_recall"] = float(hits.mean())
        out["needle_recall_std"] = float(hits.std())
    if res["count"][ti, bi].any():
        amp_seed = res["amplification_seed"][ti, bi]
        out["amplification_seed_median"] = float(np.nanmedian(amp_seed))
        nonempty = ~empty
        out["amplification_seed_pooled"] = float(
            res["mean_candidate"][ti, bi][nonempty].mean() / res["mean_random"][nonempty].mean()
        )
    return out


def retrieval_metrics(queries, keys, planes, *, needles=None, ks=KS, scale=None, values=None) -> dict:
    """Retrieval metrics of LSH candidates (planes (tables, bits, d)) for `queries` against all `keys`.

    Returns floats: ``needle_recall`` (when `needles` is given), ``recall_at_k`` for
    k in `ks` (k <= N), ``amplification``, ``amplification_seed``,
    ``candidate_fraction`` (exact), ``output_rel_error`` (when `values` is given),
    each with a ``*_std`` spread (standard deviation over queries), plus
    ``empty_fraction``, ``n_queries``, ``amplification_seed_median`` and
    ``amplification_seed_pooled``. Definitions in `nkattn.studies.lsh_recall`'s docstring.
    """
    planes = np.asarray(planes, dtype=np.float64)
    res = evaluate(queries, keys, planes, needles=needles, ks=ks, scale=scale, values=values)
    out = aggregate(res, 0, 0)
    if needles is None:
        out.pop("needle_recall", None)
    return out


# --------------------------------------------------------------------------------------
# Theory and statistics
# --------------------------------------------------------------------------------------


def isotropic_candidate_fraction(d, bits, tables) -> float:
    """Expected candidate fraction for independent isotropic query and key: E_c[P(c)], c with density ∝ (1-c^2)^((d-3)/2)."""
    c = np.linspace(-1, 1, 40001)[1:-1]
    w = (1 - c * c) ** ((d - 3) / 2)
    return float((collision_probability(c, bits, tables) * w).sum() / w.sum())


def wilson(hits, n, z=1.959964):
    """Wilson score interval of a binomial proportion."""
    hits, n = np.asarray(hits, dtype=float), np.asarray(n, dtype=float)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def clopper_pearson(hits, n, level=0.95):
    """Exact (Clopper-Pearson) interval of a binomial proportion."""
    from scipy.special import (
        betaincinv,  # the beta quantile, without importing scipy.stats
    )

    hits, n = np.asarray(hits, dtype=float), np.asarray(n, dtype=float)
    a = (1 - level) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(hits > 0, betaincinv(np.maximum(hits, 1e-300), n - hits + 1, a), 0.0)
        hi = np.where(hits < n, betaincinv(hits + 1, np.maximum(n - hits, 1e-300), 1 - a), 1.0)
    return lo, hi


def collision_rates(cos, d, n_pairs, seed, *, bits, tables):
    """Collisions of n_pairs random (query, key) pairs at exactly `cos`, one plane draw with `seed`.

    Returns hits (len(tables), len(bits)) int.
    """
    rng = np.random.default_rng(seed)
    planes = hyperplanes(d, max(bits), max(tables), seed)
    q = rng.standard_normal((n_pairs, d))
    directions, norms = needle_geometry(q, rng)
    k = planted(q, directions, cos, norms)
    return _collide(hash_codes(q, planes), hash_codes(k, planes), bits, tables).sum(axis=-1)


def gini(sizes) -> float:
    """Gini coefficient of non-negative sizes (0 = all equal, -> 1 = one holds all)."""
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    n = x.size
    total = x.sum()
    if total == 0:
        return 0.0
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * total))


def bucket_skew(k_codes, bits) -> list[dict]:
    """Per bits: largest bucket share, Gini and collision mass of the keys' buckets, mean (and max) over tables."""
    rows = []
    n = k_codes.shape[0]
    for b in bits:
        mask = (1 << b) - 1
        shares, ginis, mass = [], [], []
        for t in range(k_codes.shape[1]):
            sizes = np.bincount(k_codes[:, t] & mask, minlength=1 << b)
            shares.append(sizes.max() / n)
            ginis.append(gini(sizes))
            mass.append(((sizes / n) ** 2).sum())
        rows.append(
            {
                "bits": b,
                "largest_bucket_share": round_sig(np.mean(shares)),
                "largest_bucket_share_max": round_sig(np.max(shares)),
                "gini": round_sig(np.mean(ginis)),
                "collision_mass": round_sig(np.mean(mass)),
                "collision_mass_uniform": 2.0**-b,
            }
        )
    return rows
