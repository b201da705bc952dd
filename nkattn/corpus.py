"""Real English text that needs no download: the Python reference documentation.

The standard library ships the text of the Python language reference and
library-reference topics in ``pydoc_data.topics`` (what ``help("assert")`` prints):
79 topics, about 465k characters of English technical prose with some code and
grammar snippets, around 128k MiniLM word-pieces. This module cuts every topic into
passages and picks a reproducible sample of them.

Cutting: each topic is tokenized (MiniLM word-pieces when the `models` extra is
installed, whitespace words otherwise) and cut into consecutive windows of
``max_tokens - 2`` tokens (room for [CLS] and [SEP]); a window ends where a word
starts, so re-tokenizing the passage text gives the same tokens. A topic's last
window is kept when it has at least ``min_tokens - 2`` tokens. A passage id is
``"<topic>#<window>"``; with its character span and a hash of its text it pins the
passage down within one Python version (the topics change between versions, so
`provenance` records the version too).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import numpy as np

SOURCE = "pydoc_data.topics (Python reference documentation shipped with CPython)"


@dataclass(frozen=True)
class Passage:
    id: str
    topic: str
    start: int  # character span in the topic text
    end: int
    text: str
    n_tokens: int  # with [CLS] and [SEP] when cut by word-pieces

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as table

    return dict(sorted(table.items()))


def _word_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, ch in enumerate(text):
        if ch.isspace():
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(text)))
    return spans


def _token_offsets(text: str, tokenizer) -> list[tuple[int, int]]:
    """Character offsets of each token of `text` (no special tokens)."""
    if tokenizer is None:
        return _word_spans(text)
    return [tuple(o) for o in tokenizer.encode(text, add_special_tokens=False).offsets]


def cut_passages(min_tokens: int = 32, max_tokens: int = 512, tokenizer=None) -> list[Passage]:
    """Every passage of every topic, in topic order (see the module docstring)."""
    if not 2 < min_tokens <= max_tokens:
        raise ValueError(f"need 2 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    width = max_tokens - 2
    passages = []
    for topic, text in topics().items():
        offsets = _token_offsets(text, tokenizer)
        # a cut may fall only before a token that starts a new word
        starts_word = [i == 0 or (o[0] > 0 and text[o[0] - 1].isspace()) for i, o in enumerate(offsets)]
        first, window = 0, 0
        while first < len(offsets):
            last = min(first + width, len(offsets))
            if last < len(offsets):
                while last > first + 1 and not starts_word[last]:
                    last -= 1
            if last - first >= min_tokens - 2:
                start, end = offsets[first][0], offsets[last - 1][1]
                passages.append(Passage(f"{topic}#{window}", topic, start, end, text[start:end], last - first + 2))
            first, window = last, window + 1
    return passages


def minilm_tokenizer():
    """MiniLM's word-piece tokenizer, or None without the `models` extra."""
    from nkattn.reference import bert

    if not bert.model_available():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bert.model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def sample_passages(
    n: int, *, min_tokens: int = 32, max_tokens: int = 512, seed: int = 0, tokenizer="minilm"
) -> list[Passage]:
    """`n` passages of at least `min_tokens` tokens, drawn without replacement with `seed`.

    ``tokenizer="minilm"`` uses MiniLM's word-pieces when available; pass None
    for whitespace words or any `tokenizers.Tokenizer`.
    """
    tokenizer = minilm_tokenizer() if tokenizer == "minilm" else tokenizer
    pool = cut_passages(min_tokens, max_tokens, tokenizer)
    if n > len(pool):
        raise ValueError(f"asked for {n} passages of >= {min_tokens} tokens, the corpus has {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


def provenance(passages: list[Passage], *, seed: int, min_tokens: int, max_tokens: int, tokenizer: str) -> dict:
    """What to record in a results file so the exact passages can be found again."""
    return {
        "corpus": SOURCE,
        "python": sys.version.split()[0],
        "tokenizer": tokenizer,
        "seed": seed,
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "passages": [
            {"id": p.id, "chars": [p.start, p.end], "n_tokens": p.n_tokens, "sha256": p.sha256} for p in passages
        ],
    }
