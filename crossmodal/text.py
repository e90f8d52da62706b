"""Text handling shared by the text towers: normalisation, a word tokenizer, a bag-of-words
vocabulary, query checks.

Text is normalised to Unicode NFKC (``normalize_text``) where it enters: dataset captions
(``make_record``), vocabularies and queries (``tokenize_words`` and the towers' ``tokenize``),
so "crème" typed composed, decomposed (NFD) or in a compatibility form (full-width letters,
ligatures) is one word everywhere.

The bag-of-words towers (``bow_mlp``, ``textcnn``) fit a ``BowVocabulary`` on the training
captions and save it in the run folder as ``vocab.json``; the transformer towers use their
own Hugging Face tokenizer. Both kinds reject unusable queries with ``QueryError``, through
the one check of ``check_query_words``. The checks are plain functions of a tower's
``read_query`` (``check_query``, ``unknown_query_words``), so that an encoder without torch
(the exported encoders of a run) applies the same rules with the same messages.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

VOCAB_FORMAT_VERSION = 1
# Ids reserved in front of the words by ``BowVocabulary.encode_ids``.
PAD_ID = 0
UNK_ID = 1
N_SPECIAL_IDS = 2

NORMAL_FORM = "NFKC"
EMPTY_QUERY_MESSAGE = "the text query is empty; type a few words"
# A query with something in it that the model still cannot read: said as such, never "empty".
NO_WORDS_MESSAGE = "the query {query} has no words (letters or digits); type a few words"
UNKNOWN_WORDS_MESSAGE = "none of the query's words are in the model's vocabulary: {words}; try other keywords"
MAX_NAMED_WORDS = 10  # unknown words named in a message; the rest are counted
NO_WORD_LIST_MESSAGE = (
    "this text model has no word list (its dataset ships bag-of-words vectors only), "
    "so it cannot encode typed text"
)

#: ``text -> (known pieces, unknown pieces)``: how a text tower reads a query
QueryReader = Callable[[str], tuple[list[str], list[str]]]


class QueryError(ValueError):
    """A text query that the model cannot encode meaningfully; the message says why."""


def normalize_text(text: str) -> str:
    """``text`` in Unicode normal form NFKC: composed, with compatibility forms folded
    (full-width letters, ligatures, circled digits become plain letters and digits)."""
    return unicodedata.normalize(NORMAL_FORM, text)


@functools.cache
def _word_re() -> re.Pattern[str]:
    """Words: a letter or digit, then letters, digits and combining marks (which ``\\w`` lacks,
    so that Devanagari or Thai words and marks without a composed form do not split a word)."""
    category = unicodedata.category
    cps = [cp for cp in range(sys.maxunicode + 1) if category(chr(cp))[0] == "M"]
    ranges: list[list[int]] = []
    for cp in cps:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    marks = [f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges]
    part = rf"[^\W_](?:[^\W_]|[{''.join(marks)}])*"
    return re.compile(rf"{part}(?:'{part})?")


def tokenize_words(text: str) -> list[str]:
    """Split ``text`` into lower-case NFKC words (letters and digits with their combining marks;
    ``_`` and punctuation split).

    Example:
        ``tokenize_words("A Cat's toy, 2x!")`` gives ``["a", "cat's", "toy", "2x"]``.
    """
    return _word_re().findall(normalize_text(normalize_text(text).lower()))


def is_blank(text: str) -> bool:
    """True when ``text`` holds nothing visible: whitespace, control and format characters only
    (a zero-width space U+200B, a byte-order mark, a soft hyphen are format characters)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def check_not_empty(text: str) -> None:
    """Raise ``QueryError`` when ``text`` is not a string, or is empty once whitespace,
    control and format characters are left out (``is_blank``)."""
    if not isinstance(text, str):
        raise QueryError(f"a text query must be a string, got {type(text).__name__}")
    if is_blank(text):
        raise QueryError(EMPTY_QUERY_MESSAGE)


def name_words(words: Iterable[str], max_chars: int = 40) -> str:
    """Words for a message: the first ``MAX_NAMED_WORDS`` distinct ones, each cut to
    ``max_chars`` characters (a 5,000-letter word is not repeated whole), and how many more."""
    unique = list(dict.fromkeys(words))
    more = len(unique) - MAX_NAMED_WORDS
    shown = [w if len(w) <= max_chars else w[:max_chars] + "..." for w in unique[:MAX_NAMED_WORDS]]
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def check_query_words(text: str, known: list[str], unknown: list[str]) -> None:
    """The one query check every text tower runs, on the query as its tokenizer reads it.

    Args:
        text: the query.
        known: the pieces of the query the tower represents (vocabulary words; for a
            transformer, tokens other than special and unknown tokens).
        unknown: the pieces it cannot represent (out-of-vocabulary words, text that became
            the unknown token).

    Raises:
        QueryError: one message per case: the query is empty (``EMPTY_QUERY_MESSAGE``), has no
            word at all (``NO_WORDS_MESSAGE``), or none of its words is known
            (``UNKNOWN_WORDS_MESSAGE``, naming them). A query with some unknown words passes;
            the engine names them as ignored.
    """
    check_not_empty(text)
    if known:
        return
    if not unknown:
        shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:40] + "..."
        raise QueryError(NO_WORDS_MESSAGE.format(query=repr(shown)))
    raise QueryError(UNKNOWN_WORDS_MESSAGE.format(words=name_words(unknown)))


def check_query(text: str, read_query: QueryReader) -> None:
    """Raise ``QueryError`` when ``text`` cannot be encoded meaningfully by a tower that reads
    queries with ``read_query``: empty (only whitespace, control or zero-width characters), no
    word, or no word the tower knows (``check_query_words``)."""
    check_not_empty(text)
    check_query_words(text, *read_query(text))


def unknown_query_words(text: str, read_query: QueryReader) -> list[str]:
    """The words of a usable query that a tower reading with ``read_query`` cannot represent,
    without repeats, in order (it answers from the others).

    Raises:
        QueryError: ``text`` is not a string or is empty.
    """
    check_not_empty(text)
    return list(dict.fromkeys(read_query(text)[1]))


def split_tokens(
    text: str,
    ids: Sequence[int],
    tokens: Sequence[str],
    offsets: Sequence[tuple[int, int]],
    unk_id: int | None,
    special_ids: Iterable[int],
) -> tuple[list[str], list[str]]:
    """A subword tokenizer's reading of ``text``: the tokens it represents (other than special
    and unknown tokens), and the pieces of ``text`` that became unknown tokens.

    Args:
        text: the text as tokenized (NFKC, as the towers tokenize it).
        ids, tokens, offsets: the token ids, token strings and ``(start, end)`` character
            offsets into ``text``, one each per token, without special tokens added.
        unk_id: the unknown token's id (None: the tokenizer has none).
        special_ids: ids of special tokens (the unknown token's id among them is ignored).
    """
    special = set(special_ids) - {unk_id}
    known = [t for i, t in zip(ids, tokens) if i != unk_id and i not in special]
    unknown = [text[s:e] for i, (s, e) in zip(ids, offsets) if i == unk_id]
    return known, unknown


def read_vocab_query(vocab: BowVocabulary | None, text: str) -> tuple[list[str], list[str]]:
    """How a vocabulary tower reads ``text``: its words in ``vocab``, and those not in it.

    Raises:
        QueryError: there is no vocabulary (a dataset of bag-of-words vectors only).
    """
    if vocab is None:
        raise QueryError(NO_WORD_LIST_MESSAGE)
    return vocab.split_known(text)


class BowVocabulary:
    """A fixed word list mapping words to columns of a bag-of-words vector.

    Words are ordered by descending training count, ties alphabetically, so fitting the
    same captions always gives the same vocabulary. Words are looked up in their NFKC form,
    as ``tokenize_words`` gives them; a word list saved before normalisation loads as it is
    (its size, and so the model's input layer, is unchanged), and a word that normalises
    to an earlier one answers to that one's column.
    """

    def __init__(self, words: Iterable[str]) -> None:
        self.words: list[str] = list(words)
        if len(set(self.words)) != len(self.words):
            dupes = sorted(w for w, c in Counter(self.words).items() if c > 1)
            raise ValueError(f"vocabulary words must be unique; repeated: {dupes[:10]}")
        self.index: dict[str, int] = {}
        for i, w in enumerate(self.words):
            self.index.setdefault(normalize_text(normalize_text(w).lower()), i)

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

    def split_known(self, text: str) -> tuple[list[str], list[str]]:
        """The words of ``text`` in the vocabulary, and those not in it, in order."""
        words = tokenize_words(text)
        return [w for w in words if w in self.index], [w for w in words if w not in self.index]

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
