"""Table-lookup attention on MiniLM: palettes per head, score ranking, top-k, output error, end to end.

Palettes are fitted per (layer, head) on training passages (`fit_codebooks`) and
measured on held-out ones (`attention_part`); `end_to_end` swaps table attention
into every layer of the float64 BERT and compares sentence embeddings.
Definitions are in `nkattn.studies.distance`'s docstring.
"""

from __future__ import annotations

import numpy as np

from nkattn.reference import table as T
from nkattn.results import round_sig
from nkattn.studies._common import relative_frobenius_error
from nkattn.studies.distance_engine import spearman

TOPK = (1, 5, 10)


def fit_codebooks(train, palette_size, *, seed=0, progress=True) -> dict:
    """{variant: [[TableCodebook per head] per layer]} fitted on the training traces."""
    from tqdm.auto import tqdm

    layers, heads, _, d = train[0][0].shape
    scale = 1.0 / np.sqrt(d)
    books = {name: [[None] * heads for _ in range(layers)] for name in ("seed", "seed-tuned", "dot")}
    for layer, head in tqdm([(a, b) for a in range(layers) for b in range(heads)], desc="palettes", disable=not progress):
        q = np.concatenate([t[0][layer, head] for t in train])
        k = np.concatenate([t[1][layer, head] for t in train])
        books["seed"][layer][head] = T.fit_seed_codebook(q, k, palette_size)
        books["dot"][layer][head] = T.fit_dot_codebook(q, k, scale, seed=seed + 7 * (layer * heads + head), size=palette_size)
        books["seed-tuned"][layer][head] = tune_seed_temperature(
            books["seed"][layer][head], [(t[0][layer, head], t[1][layer, head], t[2][layer, head]) for t in train[:2]]
        )
    return books


TEMPERATURES = tuple(float(t) for t in np.logspace(-4, 0, 25))


def tune_seed_temperature(book, heads_qkv) -> T.TableCodebook:
    """The seed's table with the best score scale -tau (tau from `TEMPERATURES`) for this head.

    Chosen to minimise the summed output error on training passages; the seed's
    own scale is tau = 1e-3. Separates "the softmax temperature is wrong" from
    "a distance is not a dot product".
    """
    from dataclasses import replace

    errors = np.zeros(len(TEMPERATURES))
    for q, k, v in heads_qkv:
        s = q @ k.T / np.sqrt(q.shape[1])
        p = np.exp(s - s.max(-1, keepdims=True))
        o = (p / p.sum(-1, keepdims=True)) @ v
        dist = book.table_u16[book.encode_q(q)[:, None], book.encode_k(k)[None, :]].astype(np.float64)
        for i, tau in enumerate(TEMPERATURES):
            logits = -tau * dist
            pt = np.exp(logits - logits.max(-1, keepdims=True))
            errors[i] += relative_frobenius_error((pt / pt.sum(-1, keepdims=True)) @ v, o, axis=None)
    tau = TEMPERATURES[int(np.argmin(errors))]
    return replace(book, variant="seed", table=-tau * book.table_u16[: book.table.shape[0], : book.table.shape[1]]
                   .astype(np.float64), score_scale=-tau)


def rowwise_spearman(a, b) -> np.ndarray:
    """Spearman rho of every row pair (NaN for a constant row)."""
    from scipy.stats import rankdata

    ra = rankdata(a, axis=-1)
    rb = rankdata(b, axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    den = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / den, np.nan)


def topk_overlap(exact, approx, k: int, rng) -> float:
    """Mean over rows of |top-k(exact) ∩ top-k(approx)| / k, ties in `approx` broken at random."""
    top_exact = np.argsort(-exact, axis=-1, kind="stable")[:, :k]
    order = np.lexsort((rng.random(approx.shape), -approx), axis=-1)[:, :k]
    member = np.zeros(exact.shape, dtype=bool)
    np.put_along_axis(member, top_exact, True, axis=-1)
    return float(np.take_along_axis(member, order, axis=-1).sum(-1).mean() / k)


def _entropy_norm(s):
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return float(h.mean() / np.log(s.shape[-1]))


def _seed_direct_scores(q, k):
    """The seed's score without the palette: -floor(L1(base17_i16(q), base17_i16(k)) / 17) / 1000."""
    return T.SEED_SCORE_SCALE * (T.l1_distances(T.base17_i16(q), T.base17_i16(k)) // T.SEED_TABLE_DIVISOR)


def head_quality(q, k, v, books_for_head, rng) -> list[dict]:
    """Metrics of each variant for one head of one passage; q, k, v (N, d)."""
    d = q.shape[1]
    s = q @ k.T / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p / p.sum(-1, keepdims=True)) @ v
    uniform_err = float(relative_frobenius_error(v.mean(0, keepdims=True), o, axis=None))
    variants = {}
    for name, book in books_for_head.items():
        qc, kc = book.encode_q(q)[None, None], book.encode_k(k)[None, None]
        kw = {"score_scale": book.score_scale, "score_offset": book.score_offset}
        logits = T.lookup_scores(qc, kc, book.table_u16, **kw)[0, 0]
        o_t = T.table_attention_ref(qc, kc, book.table_u16, v[None, None], **kw)[0][0, 0]
        variants[name] = (logits, o_t, len(np.unique(qc)), len(np.unique(kc)))
    s_direct = _seed_direct_scores(q, k)
    pd = np.exp(s_direct - s_direct.max(-1, keepdims=True))
    variants["seed-direct"] = (s_direct, (pd / pd.sum(-1, keepdims=True)) @ v, None, None)
    out = []
    for name, (logits, o_t, nq_codes, nk_codes) in variants.items():
        rec = {
            "variant": name,
            "score_rho_all": round_sig(spearman(s.ravel(), logits.ravel())),
            "score_rho_row": round_sig(np.nanmean(rowwise_spearman(s, logits))),
            "out_rel_err": round_sig(relative_frobenius_error(o_t, o, axis=None)),
            "uniform_rel_err": round_sig(uniform_err),
            "logit_range": round_sig(logits.max() - logits.min()),
            "exact_logit_range": round_sig(s.max() - s.min()),
            "entropy_norm": round_sig(_entropy_norm(logits)),
            "exact_entropy_norm": round_sig(_entropy_norm(s)),
            "q_codes_used": nq_codes,
            "k_codes_used": nk_codes,
        }
        for kk in TOPK:
            rec[f"top{kk}"] = round_sig(topk_overlap(s, logits, kk, rng))
        out.append(rec)
    return out


def attention_part(test, books, *, progress=True) -> list[dict]:
    from tqdm.auto import tqdm

    layers, heads = len(books["seed"]), len(books["seed"][0])
    tuned_tau = {(a, b): -books["seed-tuned"][a][b].score_scale for a in range(layers) for b in range(heads)}
    rng = np.random.default_rng(0)
    records = []
    bar = tqdm(total=len(test) * layers * heads, desc="heads", disable=not progress)
    for passage, (q, k, v) in enumerate(test):
        for layer in range(layers):
            for head in range(heads):
                hb = {name: books[name][layer][head] for name in books}
                for rec in head_quality(q[layer, head], k[layer, head], v[layer, head], hb, rng):
                    if rec["variant"] == "seed-tuned":
                        rec["tau"] = round_sig(tuned_tau[layer, head])
                    records.append({"layer": layer, "head": head, "passage": passage, "n": q.shape[2], **rec})
                bar.update()
    bar.close()
    return records


def table_hook(books_by_layer, *, uniform=False):
    """A `BertEncoder` attention hook that runs table attention with per-(layer, head) codebooks.

    The hook is called once per layer in order; it counts calls to know the layer.
    """
    state = {"calls": 0}
    layers = len(books_by_layer)

    def hook(q, k, v, *, key_lengths=None):
        layer = state["calls"] % layers
        state["calls"] += 1
        o = np.empty_like(q)
        for head in range(q.shape[1]):
            if uniform:
                count = k.shape[2] if key_lengths is None else np.asarray(key_lengths)
                visible = np.arange(k.shape[2])[None, :] < np.broadcast_to(count, (q.shape[0],))[:, None]
                mean = (v[:, head] * visible[..., None]).sum(1) / visible.sum(1)[:, None]
                o[:, head] = mean[:, None, :]
                continue
            book = books_by_layer[layer][head]
            qc, kc = book.encode_q(q[:, head])[:, None], book.encode_k(k[:, head])[:, None]
            o[:, head] = T.table_attention_ref(
                qc, kc, book.table_u16, v[:, head : head + 1], score_scale=book.score_scale,
                score_offset=book.score_offset, key_lengths=key_lengths,
            )[0][:, 0]
        return o

    return hook


def end_to_end(encoder, passages, books, max_tokens, *, progress=True) -> tuple[list[dict], dict]:
    """Sentence-embedding cosine (table vs exact) per passage, and retrieval of the passage."""
    from tqdm.auto import tqdm

    variants = {name: {"books_by_layer": books[name]} for name in books}
    variants["uniform"] = {"books_by_layer": books["dot"], "uniform": True}
    exact, emb = [], {name: [] for name in variants}
    for p in tqdm(passages, desc="end-to-end", disable=not progress):
        ids, lengths = encoder.tokenize([p.text], max_length=max_tokens)
        exact.append(encoder.forward(ids, lengths).sentence_embeddings()[0])
        for name, kw in variants.items():
            emb[name].append(encoder.forward(ids, lengths, attention=table_hook(**kw)).sentence_embeddings()[0])
    exact = np.array(exact)
    records = []
    cross = exact @ exact.T
    off = cross[~np.eye(len(exact), dtype=bool)]
    summary = {"exact_cross_cosine_median": round_sig(np.median(off)) if off.size else None,
               "exact_cross_cosine_max": round_sig(off.max()) if off.size else None}
    for name in variants:
        e = np.array(emb[name])
        sims = e @ exact.T
        for i, p in enumerate(passages):
            records.append({"variant": name, "passage": i, "n_tokens": int(min(p.n_tokens, max_tokens)),
                            "cosine": round_sig(sims[i, i], 6), "retrieved": bool(np.argmax(sims[i]) == i)})
        summary[name] = {"cosine_mean": round_sig(np.diag(sims).mean()), "cosine_min": round_sig(np.diag(sims).min()),
                         "cosine_median": round_sig(np.median(np.diag(sims))),
                         "retrieval_top1": round_sig(np.mean(np.argmax(sims, axis=1) == np.arange(len(e))))}
    return records, summary


def summarize_attention(records) -> dict:
    out = {}
    for variant in sorted({r["variant"] for r in records}):
        rows = [r for r in records if r["variant"] == variant]

        def col(key, rows=rows):
            return np.array([r[key] for r in rows], dtype=np.float64)

        out[variant] = {
            key: {"median": round_sig(np.nanmedian(col(key))), "p10": round_sig(np.nanpercentile(col(key), 10)),
                  "p90": round_sig(np.nanpercentile(col(key), 90))}
            for key in ("score_rho_all", "score_rho_row", "out_rel_err", "uniform_rel_err", "logit_range",
                        "entropy_norm", "exact_entropy_norm", *(f"top{k}" for k in TOPK))
        }
        out[variant]["rows"] = len(rows)
        out[variant]["share_better_than_uniform"] = round_sig(np.mean(col("out_rel_err") < col("uniform_rel_err")))
    return out
