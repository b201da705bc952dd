"""Point sets of the distance study: image patches, digits, Gaussian rows, MiniLM weights and activations.

Every set is built per seed (`point_sets` returns a maker per data set); the
study (`nkattn.studies.distance`) measures what projections do to them.
"""

from __future__ import annotations

import numpy as np

PATCH, STRIDE = 64, 32


def image_patches(scale: str = "unit", size: int = PATCH, stride: int = STRIDE) -> np.ndarray:
    """Patches (size x size x 3, flattened HWC) of scikit-learn's two sample photographs.

    scale: "unit" (pixels / 255), "byte" (0..255), "centered" (unit, each patch minus its mean).
    """
    from sklearn.datasets import load_sample_images

    patches = []
    for img in load_sample_images().images:
        h, w, _ = img.shape
        for y in range(0, h - size + 1, stride):
            for x in range(0, w - size + 1, stride):
                patches.append(img[y : y + size, x : x + size].reshape(-1))
    p = np.array(patches, dtype=np.float64)
    if scale == "byte":
        return p
    p = p / 255.0
    if scale == "unit":
        return p
    if scale == "centered":
        return p - p.mean(axis=1, keepdims=True)
    raise ValueError(f"scale must be unit, byte or centered, got {scale!r}")


def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float64)


def gaussian(n: int, d: int, seed: int, *, row_scaled: bool = False) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    x = rng.normal(size=(n, d))
    if row_scaled:
        x *= np.exp(rng.normal(0.0, 0.5, size=(n, 1)))
    return x


def sample_rows(x, n, seed):
    """n of the rows of x drawn without replacement (all of them if there are at most n), in their order."""
    if len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def minilm_traces(encoder, passages, n_tokens, *, progress=True, desc="minilm"):
    """q, k, v of every layer for each passage: arrays (layers, heads, n_tokens, d_head)."""
    from tqdm.auto import tqdm

    out = []
    for p in tqdm(passages, desc=desc, disable=not progress):
        ids = encoder.token_ids(p.text)
        layers = encoder.forward(np.array([encoder.wrap(ids, n_tokens)]), trace=True).layers
        out.append(tuple(np.stack([getattr(t, name)[0] for t in layers]) for name in ("q", "k", "v")))
    return out


def point_sets(n: int, *, quick: bool, minilm=None, weight_rows=None) -> dict:
    """{name: (info, make(seed) -> points (n, d) float64)}: the data sets of the distance sweep.

    `minilm` holds training traces (`minilm_traces`), `weight_rows` the GGUF weight
    rows per format and tensor; the quick run keeps one of each kind.
    """
    img = image_patches("unit")
    dig = digits()
    sets = {
        "images": ({"source": "sklearn load_sample_images, 64x64x3 patches, stride 32, pixels/255"},
                   lambda s: sample_rows(img, n, s)),
        "digits": ({"source": "sklearn load_digits (8x8, 0..16)"}, lambda s: sample_rows(dig, n, s)),
        "gaussian-d256-n50": ({"source": "iid N(0,1), the seed's setting", "seed_setting": True},
                              lambda s: gaussian(50, 256, s)),
        "gaussian-d256": ({"source": "iid N(0,1)"}, lambda s: gaussian(n, 256, s)),
        "gaussian-d256-rowscaled": ({"source": "iid N(0,1) rows times lognormal(0, 0.5)"},
                                    lambda s: gaussian(n, 256, s, row_scaled=True)),
    }
    if not quick:
        sets["gaussian-d4096"] = ({"source": "iid N(0,1)"}, lambda s: gaussian(n, 4096, s))
    if weight_rows is not None:
        for fmt, tensors in weight_rows.items():
            for kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
                if quick and (fmt != "F32" or kind not in ("attn_q",)):
                    continue
                pool = np.concatenate([x for name, x in tensors.items() if name.split(".")[2] == kind])
                sets[f"weights-{kind}-{fmt}"] = (
                    {"source": f"MiniLM {kind} weight rows, 6 layers pooled, GGUF {fmt} dequantized"},
                    lambda s, pool=pool: sample_rows(pool, n, s))
    if minilm is not None:
        train = minilm
        layers, heads = train[0][0].shape[:2]
        for which, idx in (("q", 0), ("k", 1)):
            def per_head(s, idx=idx):
                layer, head = s % layers, (7 * s + 3) % heads
                return sample_rows(np.concatenate([t[idx][layer, head] for t in train]), n, s)

            def hidden(s, idx=idx):
                layer = s % layers
                return sample_rows(np.concatenate([t[idx][layer].transpose(1, 0, 2).reshape(t[idx].shape[2], -1)
                                               for t in train]), n, s)

            sets[f"minilm-{which}-head"] = ({"source": f"MiniLM {which.upper()} rows of one head (layer s % 6, "
                                                       f"head (7 s + 3) % 12 for seed s), real text"}, per_head)
            if quick:
                continue
            sets[f"minilm-{which}-layer"] = ({"source": f"MiniLM {which.upper()} rows of all 12 heads of layer "
                                                        f"s % 6 (d = 384), real text"}, hidden)
    return sets
