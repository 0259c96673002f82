"""Tokenizers: reserved ids, no leakage from held-out text, JSON round trips, bad files."""

import json

import numpy as np
import pytest

from shared.data import CharVocab, DataError, WordTokenizer, tokenize

TRAIN = [
    "A great movie.<br /><br />Great acting, great story!",
    "The story was dull; the acting was DULL too.",
    "Great fun, don't miss it. The end",
]
HELD_OUT = "A zyzzyva of a movie: great, but quixotic."


def test_tokenize_lowercases_and_strips_tags_and_punctuation():
    assert tokenize("Great<br />acting, DON'T miss... 10/10!") == ["great", "acting", "don't", "miss", "10", "10"]


def test_word_tokenizer_keeps_frequent_words_most_frequent_first():
    tok = WordTokenizer.fit(TRAIN, min_freq=2)

    assert tok.words == ["great", "the", "acting", "dull", "story", "was"]
    assert len(tok) == 8  # + padding and unknown


def test_word_tokenizer_has_no_held_out_words():
    tok = WordTokenizer.fit(TRAIN, min_freq=1)

    held_out_only = set(tokenize(HELD_OUT)) - {w for text in TRAIN for w in tokenize(text)}

    assert held_out_only == {"zyzzyva", "of", "but", "quixotic"}
    assert not held_out_only & set(tok.words)
    word_id = {w: i for i, w in enumerate(tok.words, start=2)}
    a, movie, great = word_id["a"], word_id["movie"], word_id["great"]
    assert tok.encode(HELD_OUT, max_len=8).tolist() == [a, 1, 1, a, movie, great, 1, 1]


def test_word_tokenizer_caps_vocabulary_size():
    tok = WordTokenizer.fit(TRAIN, max_vocab=4, min_freq=1)

    assert len(tok) == 4 and tok.words == ["great", "the"]


def test_encode_pads_truncates_and_marks_unknown():
    tok = WordTokenizer.fit(TRAIN)
    great, story = tok.encode("great story", 2)

    padded = tok.encode("great unseen story", 5)
    truncated = tok.encode("great unseen story", 2)
    batch = tok.encode_batch(["great", "story great story"], 3)

    assert padded.dtype == np.int64 and padded.tolist() == [great, 1, story, 0, 0]
    assert truncated.tolist() == [great, 1]
    assert batch.shape == (2, 3) and batch.tolist() == [[great, 0, 0], [story, great, story]]
    assert tok.encode_batch([], 4).shape == (0, 4)


def test_word_tokenizer_save_load_round_trip(tmp_path):
    tok = WordTokenizer.fit(TRAIN, min_freq=1)
    path = tmp_path / "vocab.json"

    tok.save(path)
    loaded = WordTokenizer.load(path)

    assert loaded.words == tok.words and len(loaded) == len(tok)
    np.testing.assert_array_equal(loaded.encode_batch(TRAIN, 20), tok.encode_batch(TRAIN, 20))
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temp file left behind


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text("old")

    WordTokenizer.fit(TRAIN).save(path)

    assert json.loads(path.read_text())["words"][0] == "great"


def test_char_vocab_reserves_pad_and_unknown():
    vocab = CharVocab.fit(["abca", "cb!"])

    ids = vocab.encode("a?b")

    assert vocab.chars == ["!", "a", "b", "c"] and len(vocab) == 6
    assert ids.dtype == np.int64 and ids.tolist() == [3, 1, 4]
    assert vocab.decode([3, 4, 5, 0, 0]) == "abc"
    assert vocab.decode(ids) == "a\ufffdb"


def test_char_vocab_has_no_held_out_chars():
    vocab = CharVocab.fit(TRAIN)

    assert "z" not in vocab.chars and "q" not in vocab.chars
    assert vocab.encode("zq").tolist() == [1, 1]


def test_char_vocab_save_load_round_trip(tmp_path):
    vocab = CharVocab.fit(["héllo\nwörld"])
    path = tmp_path / "chars.json"

    vocab.save(path)
    loaded = CharVocab.load(path)

    assert loaded.chars == vocab.chars
    np.testing.assert_array_equal(loaded.encode("wörld\n"), vocab.encode("wörld\n"))


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "invalid JSON"),
        ('{"format": "flowerbed-char-vocab", "chars": ["a"]}', "not a flowerbed-word-tokenizer file"),
        ('{"format": "flowerbed-word-tokenizer", "words": "abc"}', "must be a list of strings"),
    ],
)
def test_word_tokenizer_load_rejects_bad_files(tmp_path, content, problem):
    path = tmp_path / "vocab.json"
    path.write_text(content)

    with pytest.raises(DataError, match=problem):
        WordTokenizer.load(path)


def test_char_vocab_load_rejects_multi_char_entries(tmp_path):
    path = tmp_path / "chars.json"
    path.write_text('{"format": "flowerbed-char-vocab", "chars": ["ab"]}')

    with pytest.raises(DataError, match="single characters"):
        CharVocab.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        WordTokenizer.load(tmp_path / "absent.json")
