"""float64 references for table-lookup attention: projections, palettes, 256 x 256 tables.

Table-lookup attention replaces the score ``q · k`` by a precomputed entry
``table[a, b]`` where ``a`` is the palette entry (code) of the query row and ``b``
the code of the key row; codes are uint8, so a table has at most 256 x 256
entries (128 KB as uint16). Everything after the lookup (masks, softmax, P · V
with the exact V) is ordinary attention.

Semantics (written once, here; the CUDA kernel ``cuda_kernels/table.py`` follows them):

* q_codes (B, H, Nq) and k_codes (B, Hkv, Nk) are integer codes (uint8 for the
  kernel), table (Pq, Pk) any numeric dtype, v (B, Hkv, Nk, d) float. Query head
  h reads key/value head ``h // (H // Hkv)`` (grouped-query attention), exactly as
  in `nkattn.reference.exact`.
* The logit of query i and key j is ``score_offset + score_scale * table[q_code_i,
  k_code_j]`` and nothing else: there is **no** extra 1/sqrt(d); the table (with
  its scale) carries the whole scale. In float32 the product
  ``float32(score_scale) * float32(table value)`` is rounded once, then
  ``+ float32(score_offset)`` rounded once.
* Masks are those of `nkattn.reference.exact`: ``key_lengths[b]`` hides keys
  ``j >= key_lengths[b]`` (never read); ``causal`` is bottom-right aligned; a query
  row with no visible key returns O = 0 and lse = -inf. Scores come from a finite
  table, so only v can carry NaN or inf into O (as in exact attention); q and k
  must be finite to be encoded.

Equivalent NumPy for one (b, h), no mask::

    s = score_offset + score_scale * table[q_codes[:, None], k_codes[None, :]]
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p @ v) / p.sum(-1, keepdims=True)

Two ways to build codes and tables are implemented, both with a float64 table
(`TableCodebook.table`) and the uint16 form the kernel reads (``table_u16``,
``score ≈ score_offset + score_scale * table_u16``):

* ``"seed"`` — the seed's (bgz17) construction. Rows are projected with the
  Base17 golden-step projection (`base17_project`) and stored as int16
  (`base17_i16`); a palette of up to 256 actual rows is chosen by greedy
  farthest-point sampling under L1 (`farthest_point_palette`, starting at the row
  nearest the mean) over the union of Q and K rows; every row is assigned to its
  L1-nearest entry (ties: lowest index); ``table_u16[a, b] = floor(L1(e_a, e_b) /
  17)`` and the score is ``-table_u16 / 1000`` (score_scale = -1e-3). The table is
  a *distance* between palette entries, so the minus sign is what makes "closer"
  mean "more attention"; its magnitude is the seed's and is not a softmax scale.
* ``"dot"`` — a dot-product table: k-means (scikit-learn, seeded, fixed n_init)
  with 256 centroids for Q rows and, separately, for K rows; ``table[a, b] =
  scale * c_q[a] · c_k[b]``; the uint16 form is the affine quantization
  ``round((table - min) / step)`` with ``step = (max - min) / 65535``, so
  ``|score_offset + score_scale * table_u16 - table| <= step / 2``.

Projections (each (n, d) -> (n, m), float64): `base17_project` (golden-step),
`mean_stride_project`, `random_project` (Gaussian N(0, 1/m)), `pca_project`.
With the golden step 11 and 17 prime, ``pos[b] = 11 b mod 17`` visits every
residue once, so Base17 is mean-stride with its 17 axes permuted: every distance
between projected rows (L1, L2, any permutation-invariant one) is identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nkattn.reference.exact import _expand_kv_heads, _read_keys, visible_key_counts

PHI = (1.0 + 5.0**0.5) / 2.0
BASE = 17
GOLDEN_STEP = round(BASE / PHI)  # 11
I16_SCALE = 256.0
I16_MIN, I16_MAX = -32768, 32767
PALETTE_SIZE = 256
SEED_TABLE_DIVISOR = 17  # table = floor(L1 / 17): 17 * 65535 / 17 fits uint16 exactly
SEED_SCORE_SCALE = -1.0e-3  # the seed's score: -table / 1000
U16_MAX = 65535
KMEANS_N_INIT = 1
KMEANS_MAX_ITER = 100

# --------------------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------------------


def _rows(x, name="x") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array of rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values")
    return x


def golden_positions(base: int = BASE, step: int = GOLDEN_STEP) -> np.ndarray:
    """``pos[b] = step * b mod base``: the residue class that Base17 axis b averages."""
    return (step * np.arange(base)) % base


def _residue_means(x: np.ndarray, m: int) -> np.ndarray:
    """Column r = mean of the elements x[:, i] with i mod m == r, accumulated in float64."""
    n, d = x.shape
    if d < m:
        raise ValueError(f"need d >= {m} to fill {m} residue classes, got d = {d}")
    sums = np.zeros((n, m))
    for r in range(m):
        sums[:, r] = x[:, r::m].sum(axis=1)
    counts = np.array([len(range(r, d, m)) for r in range(m)], dtype=np.float64)
    return sums / counts


def mean_stride_project(x, m: int = BASE) -> np.ndarray:
    """Axis b = mean of the elements with index i mod m == b, (n, d) -> (n, m) float64."""
    return _residue_means(_rows(x), m)


def base17_project(x) -> np.ndarray:
    """Base17 golden-step projection, (n, d) -> (n, 17) float64.

    Axis b is the float64 mean of every element whose index i has
    ``i mod 17 == pos[b]``, ``pos[b] = 11 b mod 17`` (11 = round(17 / phi)): the
    mean-stride axes in the order 0, 11, 5, 16, 10, 4, ... Needs d >= 17.
    """
    return _residue_means(_rows(x), BASE)[:, golden_positions()]


def to_i16(x) -> np.ndarray:
    """``round(256 x)`` (half away from zero, as Rust's ``f64::round``), clamped to int16."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("cannot store non-finite values as int16")
    scaled = x * I16_SCALE
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.clip(rounded, I16_MIN, I16_MAX).astype(np.int16)


def base17_i16(x) -> np.ndarray:
    """The seed's stored form: `base17_project` scaled by 256, rounded, clamped, int16 (n, 17)."""
    return to_i16(base17_project(x))


def gaussian_matrix(d: int, m: int, seed: int) -> np.ndarray:
    """A (d, m) matrix of i.i.d. N(0, 1/m) entries: E ||x R||^2 = ||x||^2 (Johnson-Lindenstrauss)."""
    if d < 1 or m < 1:
        raise ValueError(f"need d, m >= 1, got d = {d}, m = {m}")
    return np.random.default_rng(seed).normal(0.0, 1.0 / np.sqrt(m), size=(d, m))


def random_project(x, m: int = BASE, seed: int = 0) -> np.ndarray:
    """Gaussian random projection ``x @ R``, R = `gaussian_matrix(d, m, seed)`."""
    x = _rows(x)
    return x @ gaussian_matrix(x.shape[1], m, seed)


def pca_project(x, m: int = BASE, seed: int = 0, *, fit=None) -> np.ndarray:
    """PCA scores on the m leading components (scikit-learn, exact SVD), fitted on `fit` (default: x).

    The solver is exact (LAPACK's full SVD, or the eigendecomposition of the Gram
    matrix when d > n), so the first m' columns of an m-component result are the
    m'-component result (studies fit once and slice).
    """
    from sklearn.decomposition import PCA

    x = _rows(x)
    fit = x if fit is None else _rows(fit, "fit")
    n, d = fit.shape
    if not 1 <= m <= min(n, d):
        raise ValueError(f"PCA needs 1 <= m <= min(n, d) = {min(n, d)}, got m = {m}")
    if d <= n:
        return PCA(n_components=m, svd_solver="full", random_state=seed).fit(fit).transform(x)
    # wide data (d > n, e.g. 200 image patches of 12,288 pixels): the same principal axes from the
    # n x n Gram matrix of the centred rows, far cheaper than an SVD of the n x d matrix; equal to
    # scikit-learn's PCA up to the sign of each component (distances are unchanged)
    mean = fit.mean(axis=0)
    centred = fit - mean
    w, u = np.linalg.eigh(centred @ centred.T)
    top = np.argsort(w)[::-1][:m]
    axes = (u[:, top].T @ centred) / np.sqrt(np.maximum(w[top], np.finfo(np.float64).tiny))[:, None]
    return (x - mean) @ axes.T


PROJECTIONS = ("golden", "mean-stride", "random", "pca")


def project(x, method: str, m: int = BASE, seed: int = 0) -> np.ndarray:
    """Dispatch by name; ``golden`` exists only for m = 17."""
    if method == "golden":
        if m != BASE:
            raise ValueError(f"the golden-step projection has m = {BASE}, got m = {m}")
        return base17_project(x)
    if method == "mean-stride":
        return mean_stride_project(x, m)
    if method == "random":
        return random_project(x, m, seed)
    if method == "pca":
        return pca_project(x, m, seed)
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {method!r}")


# --------------------------------------------------------------------------------------
# Palettes and tables
# --------------------------------------------------------------------------------------


def l1_distances(a, b) -> np.ndarray:
    """(na, nb) L1 distances between integer (or float) rows, exact in int64 for integers."""
    a, b = np.asarray(a), np.asarray(b)
    dtype = np.int64 if (a.dtype.kind in "iu" and b.dtype.kind in "iu") else np.float64
    a, b = a.astype(dtype), b.astype(dtype)
    out = np.empty((a.shape[0], b.shape[0]), dtype=dtype)
    step = max(1, 2**22 // max(1, b.shape[0] * a.shape[1]))
    for start in range(0, a.shape[0], step):
        out[start : start + step] = np.abs(a[start : start + step, None, :] - b[None, :, :]).sum(-1)
    return out


def farthest_point_palette(codes, size: int = PALETTE_SIZE) -> np.ndarray:
    """Row indices of a palette chosen by greedy farthest-point sampling under L1.

    The first entry is the row nearest (L1) to the mean row; each next entry is the
    row farthest from all entries so far (max over rows of the min L1 distance; ties:
    lowest index). Stops at `size` entries or when every row equals an entry, so
    the palette has ``min(size, distinct rows)`` entries.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be a non-empty 2-D array, got shape {codes.shape}")
    if not 1 <= size <= PALETTE_SIZE:
        raise ValueError(f"palette size must be in [1, {PALETTE_SIZE}], got {size}")
    work = codes.astype(np.int64) if codes.dtype.kind in "iu" else codes.astype(np.float64)
    mean = work.mean(axis=0)
    first = int(np.argmin(np.abs(work - mean).sum(axis=1)))
    chosen = [first]
    nearest = np.abs(work - work[first]).sum(axis=1)
    while len(chosen) < size:
        nxt = int(np.argmax(nearest))
        if nearest[nxt] == 0:
            break
        chosen.append(nxt)
        nearest = np.minimum(nearest, np.abs(work - work[nxt]).sum(axis=1))
    return np.array(chosen, dtype=np.int64)


def assign_l1(codes, entries) -> np.ndarray:
    """Index of the L1-nearest entry of every row (ties: lowest index)."""
    return np.argmin(l1_distances(codes, entries), axis=1)


def assign_l2(rows, centroids) -> np.ndarray:
    """Index of the L2-nearest centroid of every row (ties: lowest index)."""
    rows = np.asarray(rows, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    d2 = (rows**2).sum(1)[:, None] - 2.0 * rows @ centroids.T + (centroids**2).sum(1)[None, :]
    return np.argmin(d2, axis=1)


def seed_distance_table(entries) -> np.ndarray:
    """``floor(L1(e_a, e_b) / 17)`` as uint16 for int16 Base17 entries (P, 17)."""
    entries = np.asarray(entries)
    if entries.dtype != np.int16:
        raise TypeError(f"seed table entries must be int16 Base17 codes, got {entries.dtype}")
    return (l1_distances(entries, entries) // SEED_TABLE_DIVISOR).astype(np.uint16)


def kmeans_centroids(rows, size: int = PALETTE_SIZE, seed: int = 0, n_init: int = KMEANS_N_INIT) -> np.ndarray:
    """k-means centroids (scikit-learn, seeded), ``min(size, distinct rows)`` of them, float64."""
    from sklearn.cluster import KMeans

    rows = _rows(rows, "rows")
    size = min(size, len(np.unique(rows, axis=0)))
    km = KMeans(n_clusters=size, n_init=n_init, max_iter=KMEANS_MAX_ITER, random_state=seed)
    return km.fit(rows).cluster_centers_.astype(np.float64)


def quantize_u16(table) -> tuple[np.ndarray, float, float]:
    """Affine uint16 form: ``table ≈ offset + scale * table_u16``, error <= scale / 2.

    ``offset = min``, ``scale = (max - min) / 65535`` (scale = 1 for a constant table).
    """
    table = np.asarray(table, dtype=np.float64)
    lo, hi = float(table.min()), float(table.max())
    scale = (hi - lo) / U16_MAX if hi > lo else 1.0
    q = np.clip(np.rint((table - lo) / scale), 0, U16_MAX).astype(np.uint16)
    return q, scale, lo


def pad_table(table, size: int = PALETTE_SIZE) -> np.ndarray:
    """Zero-pad a (Pq, Pk) table to (size, size); padded entries are never indexed by a code."""
    table = np.asarray(table)
    if table.shape[0] > size or table.shape[1] > size:
        raise ValueError(f"table {table.shape} is larger than {size} x {size}")
    out = np.zeros((size, size), dtype=table.dtype)
    out[: table.shape[0], : table.shape[1]] = table
    return out


@dataclass(frozen=True)
class TableCodebook:
    """A fitted palette pair and its table; encodes new rows.

    ``q_entries`` / ``k_entries``: int16 Base17 palette rows (seed) or float64
    centroids (dot). ``table``: the float64 reference logits (Pq, Pk).
    ``table_u16`` (256, 256) with ``score_scale`` / ``score_offset``: what the
    kernel reads (``score_offset + score_scale * table_u16[:Pq, :Pk]``).
    """

    variant: str
    q_entries: np.ndarray
    k_entries: np.ndarray
    table: np.ndarray
    table_u16: np.ndarray
    score_scale: float
    score_offset: float

    def __post_init__(self):
        # every path reads table_u16 as the kernel does: a smaller or float table would be
        # indexed past its end on the GPU and read differently by the reference
        if self.variant not in ("seed", "dot"):
            raise ValueError(f"TableCodebook variant must be 'seed' or 'dot', got {self.variant!r}")
        u16 = np.asarray(self.table_u16)
        if u16.shape != (PALETTE_SIZE, PALETTE_SIZE) or u16.dtype != np.uint16:
            raise ValueError(
                f"TableCodebook.table_u16 must be a ({PALETTE_SIZE}, {PALETTE_SIZE}) uint16 table (pad a smaller "
                f"palette with pad_table), got shape {u16.shape} dtype {u16.dtype}"
            )
        pq, pk = np.shape(self.table)
        if np.shape(self.q_entries)[0] != pq or np.shape(self.k_entries)[0] != pk:
            raise ValueError(
                f"TableCodebook.table is {pq} x {pk} but there are {np.shape(self.q_entries)[0]} query and "
                f"{np.shape(self.k_entries)[0]} key palette entries"
            )

    @property
    def palette_sizes(self) -> tuple[int, int]:
        return self.table.shape

    @property
    def head_dim(self) -> int | None:
        """d of the rows it encodes: the centroids' (dot); None for seed, whose Base17 entries take any d >= 17."""
        return int(np.shape(self.q_entries)[1]) if self.variant == "dot" else None

    def check_rows(self, head_dim: int, name: str = "q and k") -> None:
        """Refuse rows this codebook cannot encode, naming what it was fitted on."""
        if self.head_dim is not None and head_dim != self.head_dim:
            raise ValueError(
                f"this TableCodebook was fitted on rows of d = {self.head_dim}; {name} have d = {head_dim}"
            )
        if self.variant == "seed" and head_dim < BASE:
            raise ValueError(f"the seed's Base17 projection needs d >= {BASE}; {name} have d = {head_dim}")

    def quantized_table(self) -> np.ndarray:
        """float64 logits the uint16 table stands for, (Pq, Pk)."""
        pq, pk = self.table.shape
        return self.score_offset + self.score_scale * self.table_u16[:pq, :pk].astype(np.float64)

    def _encode(self, rows, entries) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        self.check_rows(rows.shape[-1], "the rows")
        flat = rows.reshape(-1, rows.shape[-1])
        if self.variant == "seed":
            codes = assign_l1(base17_i16(flat), entries)
        else:
            codes = assign_l2(flat, entries)
        return codes.astype(np.uint8).reshape(rows.shape[:-1])

    def encode_q(self, q) -> np.ndarray:
        """uint8 codes of query rows (..., d) -> (...)."""
        return self._encode(q, self.q_entries)

    def encode_k(self, k) -> np.ndarray:
        """uint8 codes of key rows (..., d) -> (...)."""
        return self._encode(k, self.k_entries)


@dataclass(frozen=True)
class TableInputs:
    """What table attention needs: codes, the kernel's uint16 table and its affine map."""

    q_codes: np.ndarray
    k_codes: np.ndarray
    table_u16: np.ndarray
    score_scale: float
    score_offset: float
    codebook: TableCodebook


def fit_seed_codebook(q_rows, k_rows, size: int = PALETTE_SIZE) -> TableCodebook:
    """The seed's palette: farthest-point L1 palette of Base17 int16 rows over Q ∪ K; L1 table."""
    q_rows, k_rows = _rows(q_rows, "q rows"), _rows(k_rows, "k rows")
    codes = base17_i16(np.concatenate([q_rows, k_rows]))
    entries = codes[farthest_point_palette(codes, size)]
    table_u16 = seed_distance_table(entries)
    table = SEED_SCORE_SCALE * table_u16.astype(np.float64)
    return TableCodebook("seed", entries, entries, table, pad_table(table_u16), SEED_SCORE_SCALE, 0.0)


def fit_dot_codebook(q_rows, k_rows, scale: float, seed: int = 0, size: int = PALETTE_SIZE) -> TableCodebook:
    """k-means palettes for Q and for K rows; ``table = scale * c_q @ c_k.T``, uint16-quantized."""
    cq = kmeans_centroids(q_rows, size, seed)
    ck = kmeans_centroids(k_rows, size, seed + 1)
    table = float(scale) * (cq @ ck.T)
    table_u16, step, offset = quantize_u16(table)
    return TableCodebook("dot", cq, ck, table, pad_table(table_u16), step, offset)


def _encode_inputs(codebook: TableCodebook, q, k) -> TableInputs:
    return TableInputs(
        codebook.encode_q(q),
        codebook.encode_k(k),
        codebook.table_u16,
        codebook.score_scale,
        codebook.score_offset,
        codebook,
    )


def seed_table(q, k, size: int = PALETTE_SIZE) -> TableInputs:
    """Fit the seed's codebook on all rows of q (..., d) and k (..., d) and encode them."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    book = fit_seed_codebook(q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]), size)
    return _encode_inputs(book, q, k)


def dot_table(q, k, scale: float, seed: int = 0, size: int = PALETTE_SIZE) -> TableInputs:
    """Fit the k-means dot-product codebook on all rows of q and k and encode them.

    For attention inputs pass q (B, H, Nq, d), k (B, Hkv, Nk, d): one table serves
    every head (the kernel reads one table), codes come back as (B, H, Nq), (B, Hkv, Nk).
    """
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    book = fit_dot_codebook(q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]), scale, seed, size)
    return _encode_inputs(book, q, k)


# --------------------------------------------------------------------------------------
# Validation and the attention oracle
# --------------------------------------------------------------------------------------


def validate_table_inputs(q_codes, k_codes, table, v=None, *, key_lengths=None, require_256: bool = False):
    """Check codes, table and values on the host; return (B, H, Hkv, Nq, Nk, d or None).

    ``require_256=True`` (what the kernel asks) also demands uint8 codes and a
    (256, 256) table. Raises TypeError for wrong kinds, ValueError for wrong shapes
    and values, naming the argument and what was seen.
    """
    q_codes, k_codes, table = np.asarray(q_codes), np.asarray(k_codes), np.asarray(table)
    for name, codes in (("q_codes", q_codes), ("k_codes", k_codes)):
        if codes.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integer codes, got dtype {codes.dtype}")
        if require_256 and codes.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8 for a 256-entry palette, got dtype {codes.dtype}")
        if codes.ndim != 3:
            raise ValueError(f"{name} must be 3-D (B, heads, N), got shape {codes.shape}")
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (Pq, Pk), got shape {table.shape}")
    if table.dtype.kind not in "iuf":
        raise TypeError(f"table must be numeric (integer or float), got dtype {table.dtype}")
    if table.size == 0:
        raise ValueError(f"table is empty, shape {table.shape}")
    if require_256 and table.shape != (PALETTE_SIZE, PALETTE_SIZE):
        raise ValueError(f"table must be {PALETTE_SIZE} x {PALETTE_SIZE} (palette size 256), got {table.shape}")
    batch, heads, nq = q_codes.shape
    kb, kv_heads, nk = k_codes.shape
    if kb != batch:
        raise ValueError(f"batch mismatch: q_codes has {batch}, k_codes has {kb}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    for name, codes, size in (("q_codes", q_codes, table.shape[0]), ("k_codes", k_codes, table.shape[1])):
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(f"{name} must lie in [0, {size}) (table shape {table.shape}), got [{codes.min()}, {codes.max()}]")
    head_dim = None
    if v is not None:
        v_arr = np.asarray(v) if not hasattr(v, "shape") or not hasattr(v, "dtype") else v
        if np.dtype(v_arr.dtype).kind != "f":
            raise TypeError(f"v must be a float array, got dtype {v_arr.dtype}")
        if len(v_arr.shape) != 4 or tuple(v_arr.shape[:3]) != (batch, kv_heads, nk):
            raise ValueError(f"v must be (B, Hkv, Nk, d) = ({batch}, {kv_heads}, {nk}, d), got shape {tuple(v_arr.shape)}")
        head_dim = int(v_arr.shape[3])
    if key_lengths is not None:
        lengths = np.asarray(key_lengths)
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"key_lengths must be integers, got dtype {lengths.dtype}")
        if lengths.shape != (batch,) or (lengths.size and (lengths.min() < 0 or lengths.max() > nk)):
            raise ValueError(f"key_lengths must be {batch} values in [0, {nk}], got {lengths.tolist()}")
    return batch, heads, kv_heads, nq, nk, head_dim


def lookup_scores(q_codes, k_codes, table, *, score_scale=1.0, score_offset=0.0, compute_dtype=np.float64):
    """q_codes (B,H,Nq) uint8, k_codes (B,Hkv,Nk) uint8 (GQA: head h reads k head h // (H//Hkv)),
    table (Pq,Pk) any numeric dtype -> logits (B,H,Nq,Nk) = score_offset + score_scale *
    table[q_codes[..., :, None], k_codes[..., None, :]], computed in compute_dtype (in float32:
    float32(score_scale) * float32(table value) rounded once, then + float32(score_offset))."""
    validate_table_inputs(q_codes, k_codes, table)
    q_codes, k_codes = np.asarray(q_codes), np.asarray(k_codes)
    k_codes = _expand_kv_heads(k_codes[..., None], q_codes.shape[1])[..., 0]
    t = np.asarray(table).astype(compute_dtype)
    ft = np.dtype(compute_dtype).type
    values = t[q_codes.astype(np.intp)[..., :, None], k_codes.astype(np.intp)[..., None, :]]
    return ft(score_offset) + ft(score_scale) * values


def table_attention_ref(
    q_codes,
    k_codes,
    table,
    v,
    *,
    score_scale=1.0,
    score_offset=0.0,
    causal=False,
    key_lengths=None,
    compute_dtype=np.float64,
):
    """Oracle: softmax over the looked-up logits (NO extra 1/sqrt(d) factor: the table's
    scale is the whole scale), masks exactly as nkattn.reference.exact (key_lengths,
    bottom-right causal, fully masked row -> O = 0, lse = -inf), then P·V with the exact
    V (B,Hkv,Nk,d). Returns (O, lse) in `compute_dtype`."""
    batch, heads, _, nq, nk, _ = validate_table_inputs(q_codes, k_codes, table, v, key_lengths=key_lengths)
    s = lookup_scores(
        q_codes, k_codes, table, score_scale=score_scale, score_offset=score_offset, compute_dtype=compute_dtype
    )
    dt = np.dtype(compute_dtype).type
    zero, one = dt(0), dt(1)
    # keys past key_lengths are never read, as in the kernel (0 * NaN would reach every row)
    read = _read_keys(batch, nk, key_lengths)[:, None, :, None]
    v = _expand_kv_heads(np.where(read, np.asarray(v, dtype=compute_dtype), zero), heads)
    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)
    visible = np.arange(nk)[None, None, None, :] < counts[:, None, :, None]
    s = np.where(visible, s, dt(-np.inf))
    with np.errstate(invalid="ignore"):
        m = s.max(axis=-1, keepdims=True, initial=-np.inf)
        empty = m == -np.inf
        p = np.where(visible, np.exp(s - np.where(empty, zero, m)), zero)
        l = p.sum(axis=-1, keepdims=True)
        o = np.where(empty, zero, (p @ v) / np.where(empty, one, l))
        lse = np.where(empty, dt(-np.inf), m + np.log(np.where(empty, one, l)))
    return o.astype(compute_dtype), lse[..., 0].astype(compute_dtype)
