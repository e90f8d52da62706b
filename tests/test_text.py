from __future__ import annotations

import json

import numpy as np
import pytest

from crossmodal.text import (
    PAD_ID,
    UNK_ID,
    BowVocabulary,
    QueryError,
    check_not_empty,
    tokenize_words,
)

CAPTIONS = ["A red cat", "a red dog", "the Cat sleeps", "dog, dog; DOG!", "zebra"]


def test_tokenize_words_lowercases_and_splits_punctuation():
    assert tokenize_words("A Cat's toy, 2x!") == ["a", "cat's", "toy", "2x"]
    assert tokenize_words("snake_case--words") == ["snake", "case", "words"]
    assert tokenize_words("Café NAÏVE") == ["café", "naïve"]
    assert tokenize_words("  ...  ") == []


def test_fit_orders_by_count_then_alphabet():
    vocab = BowVocabulary.fit(CAPTIONS)
    # dog 4, a 2, cat 2, red 2, then the singletons alphabetically
    assert vocab.words == ["dog", "a", "cat", "red", "sleeps", "the", "zebra"]
    assert len(vocab) == 7 and "cat" in vocab and "Cat" not in vocab


def test_fit_max_size_and_min_count():
    assert BowVocabulary.fit(CAPTIONS, max_size=2).words == ["dog", "a"]
    assert BowVocabulary.fit(CAPTIONS, min_count=2).words == ["dog", "a", "cat", "red"]


def test_fit_with_nothing_left_says_why():
    with pytest.raises(ValueError, match="min_count=99"):
        BowVocabulary.fit(CAPTIONS, min_count=99)
    with pytest.raises(ValueError, match="0 texts"):
        BowVocabulary.fit([])


def test_duplicate_words_are_refused():
    with pytest.raises(ValueError, match="cat"):
        BowVocabulary(["cat", "dog", "cat"])


def test_encode_bow_binary_and_counts():
    vocab = BowVocabulary(["dog", "cat"])
    bow = vocab.encode_bow(["dog dog cat", "unicorn", ""])
    assert bow.dtype == np.float32 and bow.shape == (3, 2)
    np.testing.assert_array_equal(bow, [[1, 1], [0, 0], [0, 0]])
    counts = vocab.encode_bow(["dog dog cat"], binary=False)
    np.testing.assert_array_equal(counts, [[2, 1]])


def test_encode_ids_pads_truncates_and_marks_unknown():
    vocab = BowVocabulary(["dog", "cat"])
    ids = vocab.encode_ids(["cat dog unicorn", "dog"], max_len=8)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [[3, 2, UNK_ID], [2, PAD_ID, PAD_ID]])
    assert vocab.encode_ids(["dog cat dog cat"], max_len=2).shape == (1, 2)
    assert vocab.encode_ids([""], max_len=8, min_len=3).tolist() == [[PAD_ID] * 3]


def test_oov_words_keeps_order_without_repeats():
    vocab = BowVocabulary(["dog"])
    assert vocab.oov_words("Zebra dog yak zebra") == ["zebra", "yak"]


def test_json_round_trip():
    vocab = BowVocabulary.fit(CAPTIONS)
    again = BowVocabulary.from_json(vocab.to_json())
    assert again.words == vocab.words
    assert again.index == vocab.index


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format_version": 1}), "'words'"),
        (json.dumps({"format_version": 99, "words": ["a"]}), "version 99"),
    ],
)
def test_from_json_rejects_bad_input(text, message):
    with pytest.raises(ValueError, match=message):
        BowVocabulary.from_json(text)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_check_not_empty(text):
    with pytest.raises(QueryError, match="empty"):
        check_not_empty(text)
    assert issubclass(QueryError, ValueError)
    check_not_empty("a cat")
