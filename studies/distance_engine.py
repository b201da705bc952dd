"""Distance preservation of projections: Spearman rho of pairwise distances before and after.

`point_set_rhos` measures every projection (Base17 golden-step, mean-stride,
Gaussian, PCA) of one point set; `distance_sweep` runs it over data sets and
seeds; `seed_repro` tries readings of the seed's image experiment; `gguf_part`
round-trips MiniLM's attention weights through GGUF and measures the seed's
weight-table pipeline. Definitions are in `nkattn.studies.distance`'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nkattn.reference import table as T
from nkattn.results import round_sig
from nkattn.studies.distance_data import image_patches, sample_rows

_PDIST = {"l2": "euclidean", "l1": "cityblock"}


def pair_distances(x, metric: str) -> np.ndarray:
    from scipy.spatial.distance import pdist

    return pdist(np.asarray(x, dtype=np.float64), _PDIST[metric])


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def point_set_rhos(x: np.ndarray, seed: int, ms) -> list[dict]:
    """rho of every projection / m / form / metric for one point set (one seed)."""
    n, d = x.shape
    orig = {metric: pair_distances(x, metric) for metric in _PDIST}
    out = []

    def add(projection, m, form, p, metrics=("l2", "l1"), **extra):
        for metric in metrics:
            out.append(
                {"projection": projection, "m": m, "form": form, "metric": metric,
                 "rho": spearman(orig[metric], pair_distances(p, metric)), **extra}
            )

    if d >= T.BASE:
        golden = T.base17_project(x)
        gi = T.to_i16(golden)
        clamped = float(np.mean((gi == T.I16_MIN) | (gi == T.I16_MAX)))
        add("golden", T.BASE, "float", golden)
        add("golden", T.BASE, "i16", gi, clamped_share=clamped, distinct_rows=len(np.unique(gi, axis=0)))
        add("mean-stride", T.BASE, "i16", T.to_i16(T.mean_stride_project(x, T.BASE)))
    pca_ms = [m for m in ms if m <= min(n, d)]
    pca = T.pca_project(x, max(pca_ms), seed=seed) if pca_ms else None  # exact SVD: slices are the smaller PCAs
    for m in ms:
        if m <= d:
            add("mean-stride", m, "float", T.mean_stride_project(x, m))
            add("random", m, "float", T.random_project(x, m, seed=seed))
        if m in pca_ms:
            add("pca", m, "float", pca[:, :m])
    return out


def _summarize_rhos(dataset: str, info: dict, per_seed: list[list[dict]]) -> list[dict]:
    """One record per (projection, m, form, metric) with the rho of every seed."""
    keyed: dict[tuple, list[dict]] = {}
    for rows in per_seed:
        for r in rows:
            keyed.setdefault((r["projection"], r["m"], r["form"], r["metric"]), []).append(r)
    records = []
    for (projection, m, form, metric), rows in keyed.items():
        rho = np.array([r["rho"] for r in rows])
        rec = {
            "dataset": dataset, **info, "projection": projection, "m": m, "form": form, "metric": metric,
            "seeds": len(rho), "rho_mean": round_sig(rho.mean()), "rho_std": round_sig(rho.std(ddof=1) if len(rho) > 1 else 0.0),
            "rho_min": round_sig(rho.min()), "rho_max": round_sig(rho.max()), "rho": [round_sig(v) for v in rho],
        }
        if "clamped_share" in rows[0]:
            rec["clamped_share_mean"] = round_sig(np.mean([r["clamped_share"] for r in rows]))
            rec["distinct_rows_mean"] = round_sig(np.mean([r["distinct_rows"] for r in rows]))
        records.append(rec)
    return records


def distance_sweep(datasets: dict, seeds, ms, *, progress=True) -> list[dict]:
    """datasets: name -> (info dict, make(seed) -> points)."""
    from tqdm.auto import tqdm

    records = []
    bar = tqdm(total=len(datasets) * len(seeds), desc="distance", unit="set", disable=not progress)
    for name, (info, make) in datasets.items():
        per_seed = []
        for seed in seeds:
            x = make(seed)
            per_seed.append(point_set_rhos(x, seed, ms))
            bar.update()
        info = {**info, "n": int(x.shape[0]), "d": int(x.shape[1]), "pairs": int(x.shape[0] * (x.shape[0] - 1) // 2)}
        records.extend(_summarize_rhos(name, info, per_seed))
    bar.close()
    return records


# --------------------------------------------------------------------------------------
# Reproducing the seed's image numbers
# --------------------------------------------------------------------------------------


def _repro_projections(x, seed):
    """Candidate readings of the seed's "golden" and "random 17D" for one point set."""
    rng = np.random.default_rng(5000 + seed)
    d = x.shape[1]
    golden = T.base17_project(x)
    gauss_unit = x @ rng.normal(size=(d, T.BASE))  # N(0, 1): an unnormalised matrix
    return {
        "golden float (L2)": (golden, "l2"),
        "golden i16 (L1)": (T.to_i16(golden), "l1"),
        "gaussian N(0,1/m) (L2)": (T.random_project(x, T.BASE, seed), "l2"),
        "gaussian N(0,1) i16 (L1)": (T.to_i16(gauss_unit), "l1"),
        "uniform [0,1) (L2)": (x @ rng.random((d, T.BASE)), "l2"),
        "17 random coordinates (L2)": (x[:, np.sort(rng.choice(d, T.BASE, replace=False))], "l2"),
    }


def seed_repro(scales, seeds, n_points, draws, *, progress=True) -> list[dict]:
    """rho over all pairs and over 100 random pairs, per pixel scale and projection reading."""
    from tqdm.auto import tqdm

    records = []
    bar = tqdm(total=len(scales) * len(seeds), desc="seed-repro", unit="set", disable=not progress)
    for scale in scales:
        pool = image_patches(scale)
        acc: dict[str, dict] = {}
        for seed in seeds:
            x = sample_rows(pool, n_points, seed)
            orig = {metric: pair_distances(x, metric) for metric in _PDIST}
            rng = np.random.default_rng(9000 + seed)
            subsets = [rng.choice(len(orig["l2"]), 100, replace=False) for _ in range(draws)]
            for name, (p, metric) in _repro_projections(x, seed).items():
                proj = pair_distances(p, metric)
                a = acc.setdefault(name, {"all": [], "100": [], "clamped": []})
                a["all"].append(spearman(orig[metric], proj))
                a["100"].extend(spearman(orig[metric][s], proj[s]) for s in subsets)
                if p.dtype == np.int16:
                    a["clamped"].append(float(np.mean((p == T.I16_MIN) | (p == T.I16_MAX))))
            bar.update()
        for name, a in acc.items():
            all_pairs, few = np.array(a["all"]), np.array(a["100"])
            records.append({
                "scale": scale, "variant": name, "n": n_points, "seeds": len(seeds),
                "rho_all_mean": round_sig(all_pairs.mean()), "rho_all_min": round_sig(all_pairs.min()),
                "rho_all_max": round_sig(all_pairs.max()),
                "rho_100_mean": round_sig(few.mean()), "rho_100_p5": round_sig(np.percentile(few, 5)),
                "rho_100_p95": round_sig(np.percentile(few, 95)),
                "clamped_share": round_sig(np.mean(a["clamped"])) if a["clamped"] else 0.0,
            })
    bar.close()
    return records


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------


def gguf_part(directory, weights, *, progress=True) -> tuple[list[dict], dict]:
    """Round trips in all four formats, the seed's weight-table pipeline per tensor, and the F32/Q8_0 rows."""
    from tqdm.auto import tqdm

    from nkattn import gguf_weights as G

    records = [{"part": "roundtrip", **r} for r in G.minilm_roundtrips(directory, weights=weights)]
    rows = {}
    names = list(weights)
    for fmt in ("F32", "Q8_0"):
        path = Path(directory) / f"minilm-attn-{fmt.lower()}.gguf"
        for name in tqdm(names, desc=f"weights table {fmt}", disable=not progress):
            wt = G.weights_table(path, name)
            true_l2 = pair_distances(wt.rows, "l2")
            true_l1 = pair_distances(wt.rows, "l1")
            codes = wt.codes_i16.astype(np.float64)
            i16_l1 = pair_distances(codes, "l1")
            a, b = np.triu_indices(len(wt.rows), 1)
            table_d = wt.table[wt.assignment[a], wt.assignment[b]].astype(np.float64)
            records.append({
                "part": "weights-table", "format": fmt, "tensor": name, "rows": len(wt.rows),
                "palette": len(wt.palette_rows), "distinct_i16_rows": len(np.unique(wt.codes_i16, axis=0)),
                "i16_abs_max": int(np.abs(wt.codes_i16).max()),
                "rho_i16_l1_vs_l1": round_sig(spearman(true_l1, i16_l1)),
                "rho_i16_l1_vs_l2": round_sig(spearman(true_l2, i16_l1)),
                "rho_table_vs_l1": round_sig(spearman(true_l1, table_d)),
                "rho_table_vs_l2": round_sig(spearman(true_l2, table_d)),
                "same_entry_pairs": round_sig(np.mean(wt.assignment[a] == wt.assignment[b])),
            })
            rows.setdefault(fmt, {})[name] = wt.rows
    return records, rows
