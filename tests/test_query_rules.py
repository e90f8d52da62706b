"""The query rules of ``crossmodal.text`` as plain functions of a tower's reading, shared by the
torch towers and the exported encoders (numpy only)."""

from __future__ import annotations

import re

import pytest

from crossmodal.text import (
    EMPTY_QUERY_MESSAGE,
    NO_WORD_LIST_MESSAGE,
    BowVocabulary,
    QueryError,
    check_query,
    read_vocab_query,
    split_tokens,
    unknown_query_words,
)


def reader(known: list[str], unknown: list[str]):
    return lambda text: (known, unknown)


@pytest.mark.parametrize(
    ("text", "known", "unknown", "message"),
    [
        ("", [], [], f"^{re.escape(EMPTY_QUERY_MESSAGE)}$"),
        ("\u200b\ufeff", ["x"], [], f"^{re.escape(EMPTY_QUERY_MESSAGE)}$"),  # blank before the tower is asked
        ("!!!", [], [], "^the query '!!!' has no words \\(letters or digits\\); type a few words$"),
        ("zebra 🍎", [], ["zebra", "🍎"],
         "^none of the query's words are in the model's vocabulary: zebra, 🍎; try other keywords$"),
    ],
)  # fmt: skip
def test_check_query_refuses_with_one_message_per_case(text, known, unknown, message):
    with pytest.raises(QueryError, match=message):
        check_query(text, reader(known, unknown))


def test_unknown_words_of_a_usable_query_are_named_once():
    check_query("red zebra", reader(["red"], ["zebra"]))
    assert unknown_query_words("red zebra zebra", reader(["red"], ["zebra", "zebra"])) == ["zebra"]
    with pytest.raises(QueryError, match=EMPTY_QUERY_MESSAGE):
        unknown_query_words(" ", reader([], []))


def test_split_tokens_leaves_out_special_tokens_and_names_unknown_text():
    text = "red zebra 🍎"
    ids, tokens = [5, 1, 1, 2], ["red", "[UNK]", "[UNK]", "[CLS]"]
    known, unknown = split_tokens(text, ids, tokens, [(0, 3), (4, 9), (10, 11), (0, 0)], 1, [1, 2, 3])
    assert known == ["red"] and unknown == ["zebra", "🍎"]


def test_a_vocabulary_tower_reads_its_words_or_refuses_without_a_word_list():
    vocab = BowVocabulary(["red", "star"])
    assert read_vocab_query(vocab, "Red zebra star") == (["red", "star"], ["zebra"])
    with pytest.raises(QueryError, match=f"^{re.escape(NO_WORD_LIST_MESSAGE)}$"):
        read_vocab_query(None, "red")


@pytest.mark.parametrize(
    ("text", "known", "unknown"),
    [("猫", [], ["猫"]), ("🐱 ❤️", [], ["🐱", "❤️"]), ("a" * 5000, [], ["a" * 5000]), ("🐱 ❤️", [], [])],
    ids=["cjk", "emoji_unknown", "5000_letters", "emoji_no_words"],
)
def test_a_query_with_text_in_it_is_never_called_empty(text, known, unknown):
    """Reported by a new user: "猫" was refused as "the text query is empty" and then, in the
    same line, as unknown words. A query with something in it gets one message that says what
    the model could not read."""
    with pytest.raises(QueryError) as err:
        check_query(text, reader(known, unknown))
    message = str(err.value)
    assert "empty" not in message and message.count(";") == 1 and len(message) < 200
    if unknown:
        assert message.startswith("none of the query's words are in the model's vocabulary: ")
        assert message.endswith("; try other keywords")
    else:
        assert message.startswith(f"the query {text!r} has no words")


@pytest.mark.parametrize("text", ["", " \t\n", "\u200b\ufeff"])
def test_a_blank_query_is_called_empty(text):
    with pytest.raises(QueryError, match=f"^{re.escape(EMPTY_QUERY_MESSAGE)}$"):
        check_query(text, reader(["x"], []))


def test_a_refused_long_word_is_not_repeated_whole():
    # reported against search front ends: a pasted 5,000-character string echoed back in full
    word = "x" * 5000
    with pytest.raises(QueryError) as err:
        check_query(word, reader([], [word]))
    assert len(str(err.value)) < 200 and "x" * 40 + "..." in str(err.value)
