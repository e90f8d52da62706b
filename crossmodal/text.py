"""Text handling shared by the text towers: a word tokenizer, a bag-of-words vocabulary, query checks.

The bag-of-words towers (``bow_mlp``, ``textcnn``) fit a ``BowVocabulary`` on the training
captions and save it in the run folder as ``vocab.json``; the transformer towers use their
own Hugging Face tokenizer. Both kinds reject unusable queries with ``QueryError``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

VOCAB_FORMAT_VERSION = 1
# Ids reserved in front of the words by ``BowVocabulary.encode_ids``.
PAD_ID = 0
UNK_ID = 1
N_SPECIAL_IDS = 2

_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


class QueryError(ValueError):
    """A text query that the model cannot encode meaningfully; the message says why."""


def tokenize_words(text: str) -> list[str]:
    """Split ``text`` into lower-case words (letters and digits; ``_`` and punctuation split).

    Example:
        ``tokenize_words("A Cat's toy, 2x!")`` gives ``["a", "cat's", "toy", "2x"]``.
    """
    return _WORD_RE.findall(text.lower())


def check_not_empty(text: str) -> None:
    """Raise ``QueryError`` when ``text`` is empty or only whitespace."""
    if not isinstance(text, str):
        raise QueryError(f"a text query must be a string, got {type(text).__name__}")
    if not text.strip():
        raise QueryError("the text query is empty; type a few words")


class BowVocabulary:
    """A fixed word list mapping words to columns of a bag-of-words vector.

    Words are ordered by descending training count, ties alphabetically, so fitting the
    same captions always gives the same vocabulary.
    """

    def __init__(self, words: Iterable[str]) -> None:
        self.words: list[str] = list(words)
        self.index: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            dupes = sorted(w for w, c in Counter(self.words).items() if c > 1)
            raise ValueError(f"vocabulary words must be unique; repeated: {dupes[:10]}")

    @classmethod
    def fit(cls, texts: Iterable[str], max_size: int | None = None, min_count: int = 1) -> BowVocabulary:
        """Build a vocabulary from ``texts``.

        Args:
            texts: training captions.
            max_size: keep at most this many of the most frequent words (``None``: all).
            min_count: drop words seen fewer times than this.

        Raises:
            ValueError: no word survives (no texts, or ``min_count`` too high).
        """
        counts: Counter[str] = Counter()
        n_texts = 0
        for text in texts:
            counts.update(tokenize_words(text))
            n_texts += 1
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[:max_size]
        if not kept:
            raise ValueError(
                f"empty vocabulary: {n_texts} texts, {len(counts)} distinct words, "
                f"none seen at least min_count={min_count} times"
            )
        return cls(kept)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    def oov_words(self, text: str) -> list[str]:
        """The words of ``text`` that are not in the vocabulary, in order, without repeats."""
        return list(dict.fromkeys(w for w in tokenize_words(text) if w not in self.index))

    def encode_bow(self, texts: list[str], binary: bool = True) -> np.ndarray:
        """Bag-of-words rows ``[len(texts), len(self)]`` float32 (word presence or counts)."""
        out = np.zeros((len(texts), len(self)), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in tokenize_words(text):
                col = self.index.get(word)
                if col is not None:
                    out[row, col] = 1.0 if binary else out[row, col] + 1.0
        return out

    def encode_ids(self, texts: list[str], max_len: int, min_len: int = 1) -> np.ndarray:
        """Word ids ``[len(texts), L]`` int64, right-padded with ``PAD_ID``.

        Word ``i`` of the vocabulary gets id ``i + N_SPECIAL_IDS``; unknown words get ``UNK_ID``.
        ``L`` is the longest text's length clipped to ``max_len``, and at least ``min_len``.
        """
        rows = [[self._word_id(w) for w in tokenize_words(t)][:max_len] for t in texts]
        width = max([min_len, *(len(r) for r in rows)])
        out = np.full((len(texts), width), PAD_ID, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def _word_id(self, word: str) -> int:
        col = self.index.get(word)
        return UNK_ID if col is None else col + N_SPECIAL_IDS

    def to_json(self) -> str:
        return json.dumps({"format_version": VOCAB_FORMAT_VERSION, "words": self.words}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> BowVocabulary:
        """Read what ``to_json`` wrote.

        Raises:
            ValueError: the text is not a vocabulary of a version this code reads.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"vocabulary is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or "words" not in raw:
            raise ValueError("vocabulary JSON lacks the key 'words'")
        if raw.get("format_version") != VOCAB_FORMAT_VERSION:
            raise ValueError(
                f"vocabulary format version {raw.get('format_version')}, "
                f"this code reads {VOCAB_FORMAT_VERSION}"
            )
        return cls(raw["words"])
