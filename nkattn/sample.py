"""A built-in sample of real attention inputs: Q, K, V of four MiniLM heads.

``nkattn/data/minilm_sample.npz`` holds float32 q, k, v of shape (1, 4, 128, 32):
four heads of all-MiniLM-L6-v2 from four different layers (a low-, two middle- and
a high-entropy head, chosen from the rank-entropy study), computed by the float64
NumPy encoder `nkattn.reference.bert` on the first 128 tokens of one passage of
the Python documentation (`nkattn.corpus`). `load_sample` reads it with NumPy
only (no torch, no `models` extra); `build_sample` regenerates it from the model::

    python -c "from nkattn.sample import build_sample; build_sample()"
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

SAMPLE_FILE = "minilm_sample.npz"
SAMPLE_LENGTH = 128
# (layer, head) pairs; see the heatmaps of the rank-entropy study
SAMPLE_HEADS = ((0, 2), (1, 8), (3, 3), (5, 6))
SAMPLE_PASSAGE = "objects#0"


def load_sample() -> dict:
    """The packaged sample: {"q", "k", "v": float32 (1, H, N, 32), "description": str, ...}.

    Also "layers", "heads" (int arrays, one entry per head), "passage_id", "text" and "model".
    """
    with resources.files("nkattn").joinpath("data", SAMPLE_FILE).open("rb") as fh:
        with np.load(fh, allow_pickle=False) as data:
            out = {name: data[name] for name in data.files}
    for name in ("description", "passage_id", "text", "model"):
        out[name] = str(out[name])
    return out


def build_sample(
    path: Path | None = None, *, heads=SAMPLE_HEADS, length: int = SAMPLE_LENGTH, passage_id: str = SAMPLE_PASSAGE
) -> Path:
    """Run the model on the sample passage and write the npz (default: the packaged file)."""
    from nkattn import corpus
    from nkattn.reference.bert import MODEL_NAME, BertEncoder

    encoder = BertEncoder.from_pretrained()
    passages = {p.id: p for p in corpus.cut_passages(32, encoder.config.max_position, encoder.tokenizer)}
    if passage_id not in passages:
        raise ValueError(f"passage {passage_id!r} not in the corpus of this Python version")
    passage = passages[passage_id]
    ids = encoder.wrap(encoder.token_ids(passage.text), length)
    trace = encoder.forward(np.array([ids]), trace=True).layers
    q, k, v = (
        np.stack([getattr(trace[layer], name)[0, head] for layer, head in heads])[None].astype(np.float32)
        for name in "qkv"
    )
    text = encoder.tokenizer.decode(ids[1:-1])
    pairs = ", ".join(f"L{layer}H{head}" for layer, head in heads)
    description = (
        f"{MODEL_NAME} q/k/v of {len(heads)} heads ({pairs}) on the first {length} tokens of "
        f"passage {passage_id!r} of the Python documentation (pydoc_data.topics, sha256 {passage.sha256})"
    )
    path = Path(resources.files("nkattn").joinpath("data", SAMPLE_FILE)) if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        q=q,
        k=k,
        v=v,
        layers=np.array([layer for layer, _ in heads]),
        heads=np.array([head for _, head in heads]),
        description=np.array(description),
        passage_id=np.array(passage_id),
        text=np.array(text),
        model=np.array(MODEL_NAME),
    )
    return path
