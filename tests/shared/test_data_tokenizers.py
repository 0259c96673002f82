"""Tokenizers that need no client's text (`bytes`, `file`), a device's own text, the shipped tokenizer's checksum."""

import gzip
import hashlib
import json

import numpy as np
import pytest

from shared import messages as keys
from shared.config import ConfigError, RunConfig, load_config
from shared.data import DataError
from shared.data.federation import data_spec, load_federation, load_local
from shared.data.shipping import received_tokenizer, tokenizer_entries
from shared.data.text import ByteTokenizer, FileTokenizer
from shared.data.textsets import IGNORE

PUBLIC_TEXT = ["the film was great", "the plot was awful", "a great cast and a great plot"]


def fit_tokenizer(path, texts=PUBLIC_TEXT):
    """A word-level `tokenizers` tokenizer fitted on `texts`, saved at `path`, as an operator would."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return path


def text_config(dataset="imdb", **changes) -> RunConfig:
    model = {"imdb": "transformer-classifier", "shakespeare": "char-lm"}[dataset]
    return RunConfig(**({"dataset": dataset, "model": model, "tokenizer": "bytes", "max_len": 8} | changes))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bytes_are_ids_past_padding_and_unknown():
    tokenizer = ByteTokenizer()

    ids = tokenizer.encode_batch(["ab", "é" * 5], max_len=4)

    assert len(tokenizer) == 258
    np.testing.assert_array_equal(ids, [[ord("a") + 2, ord("b") + 2, 0, 0], [0xC3 + 2, 0xA9 + 2] * 2])


def test_a_tokenizer_file_maps_words_past_padding_and_unknown(tmp_path):
    tokenizer = FileTokenizer.load(fit_tokenizer(tmp_path / "tok.json"))

    ids = tokenizer.encode_batch(["great film", "zyzzyva"], max_len=3)

    assert ids.shape == (2, 3) and ids[0, 0] >= 2 and ids[0, 2] == 0
    assert ids[1, 0] == 2  # the file's own unknown token (its id 0), shifted past ids 0 and 1
    assert ids.max() < len(tokenizer)
    assert tokenizer.sha256 == hashlib.sha256((tmp_path / "tok.json").read_bytes()).hexdigest()


def test_a_file_that_is_no_tokenizer_is_a_data_error(tmp_path):
    (tmp_path / "tok.json").write_text('{"words": []}')

    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        FileTokenizer.load(tmp_path / "tok.json")


def test_loading_a_config_pins_the_tokenizer_checksum(tmp_path):
    path = fit_tokenizer(tmp_path / "tok.json")
    (tmp_path / "run.toml").write_text('dataset = "imdb"\nmodel = "transformer-classifier"\ntokenizer = "file"\n')

    cfg = load_config(tmp_path / "run.toml", [f"tokenizer-path={path}"])

    assert cfg.tokenizer_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_missing_tokenizer_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read tokenizer-path"):
        load_config(None, ["dataset=imdb", "model=transformer-classifier", "tokenizer=file", "tokenizer-path=no.json"])


def test_tokenizer_file_needs_a_path_where_the_config_is_loaded():
    # a device's config has no tokenizer-path (device-owned): it takes the tokenizer from its messages
    with pytest.raises(ConfigError, match="'tokenizer-path' is not set"):
        load_config(None, ["dataset=imdb", "model=transformer-classifier", "tokenizer=file"])


@pytest.mark.parametrize(("dataset", "spec"), [("imdb", (8, 2, 258)), ("shakespeare", (8, 258, 258))])
def test_an_unfitted_tokenizer_shapes_the_model_without_any_data(dataset, spec):
    got = data_spec(text_config(dataset))  # no data-path: a deployed server holds no text

    assert (got.input_dim, got.num_classes, got.vocab_size) == spec


def test_fedsim_encodes_imdb_with_the_configured_tokenizer(tmp_path):
    rows = [{"text": "great film", "label": 1, "split": "train"}, {"text": "awful", "label": 0, "split": "test"}]
    cfg = text_config(data_path=str(write_jsonl(tmp_path / "r.jsonl", rows)), num_clients=1, clients_per_round=1)

    federation = load_federation(cfg)

    np.testing.assert_array_equal(federation.client(0).x_train, ByteTokenizer().encode_batch(["great film"], 8))
    assert federation.spec.vocab_size == 258


def test_a_device_encodes_its_reviews_and_holds_some_out(tmp_path):
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(10)]

    data = load_local(write_jsonl(tmp_path / "mine.jsonl", rows), text_config(test_fraction=0.2))

    assert data.x_train.shape == (8, 8) and data.x_test.shape == (2, 8)
    assert set(data.y_train.tolist()) | set(data.y_test.tolist()) == {0, 1}


@pytest.mark.parametrize("missing", ["text", "label"])
def test_a_review_missing_a_field_is_named_with_its_line(tmp_path, missing):
    rows = [{"text": "fine", "label": 1}, {k: v for k, v in {"text": "bad", "label": 0}.items() if k != missing}]

    with pytest.raises(DataError, match=rf"line 2: missing field\(s\) \['{missing}'\]"):
        load_local(write_jsonl(tmp_path / "mine.jsonl", rows), text_config())


def test_a_review_label_outside_the_classes_is_refused(tmp_path):
    with pytest.raises(DataError, match="label 2 out of range"):
        load_local(write_jsonl(tmp_path / "mine.jsonl", [{"text": "x", "label": 2}]), text_config())


def test_a_device_trains_the_character_lm_on_plain_text_split_by_time(tmp_path):
    text = "to be or not to be " * 20  # 380 bytes
    (tmp_path / "mine.txt").write_text(text)

    data = load_local(tmp_path / "mine.txt", text_config("shakespeare", test_fraction=0.25))

    assert data.x_train.shape[1] == 32  # chunks of 4 windows of max-len 8
    first = ByteTokenizer().encode(text)
    np.testing.assert_array_equal(data.x_train[0], first[:32])
    np.testing.assert_array_equal(data.y_train[0], first[1:33])
    assert (data.y_test != IGNORE).sum() == 95 - 8  # every test position after the first window


def test_a_device_reads_the_character_lm_text_from_json_lines(tmp_path):
    path = tmp_path / "mine.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "x" * 200}) + "\n\n" + json.dumps({"other": 1}) + "\n")

    with pytest.raises(DataError, match=r"line 3: missing field\(s\) \['text'\]"):
        load_local(path, text_config("shakespeare"))


def test_the_server_ships_the_tokenizer_and_a_device_checks_it(tmp_path):
    path = fit_tokenizer(tmp_path / "tok.json")
    cfg = text_config(tokenizer="file", tokenizer_path=str(path))
    pinned = cfg.replace(tokenizer_sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    entries = tokenizer_entries(pinned)

    assert entries[keys.TOKENIZER] == path.read_bytes()
    assert len(received_tokenizer(pinned.replace(tokenizer_path="/not/on/this/device"), entries)) == len(
        FileTokenizer.load(path)
    )
    assert tokenizer_entries(text_config()) == {}  # bytes: nothing to ship


def test_a_device_refuses_a_tokenizer_other_than_the_pinned_one(tmp_path):
    other = fit_tokenizer(tmp_path / "other.json", ["entirely different words"])
    cfg = text_config(tokenizer="file", tokenizer_path="/server/tok.json", tokenizer_sha256="0" * 64)

    with pytest.raises(DataError, match="tokenizer checksum mismatch"):
        received_tokenizer(cfg, tokenizer_entries(cfg.replace(tokenizer_path=str(other), tokenizer_sha256="")))


def test_a_device_refuses_a_tokenizer_damaged_on_the_way(tmp_path):
    entries = tokenizer_entries(text_config(tokenizer="file", tokenizer_path=str(fit_tokenizer(tmp_path / "t.json"))))
    entries[keys.TOKENIZER] += b" "

    with pytest.raises(DataError, match="tokenizer checksum mismatch"):
        received_tokenizer(text_config(tokenizer="file", tokenizer_path="/server/tok.json"), entries)


def test_a_message_without_the_tokenizer_is_refused():
    with pytest.raises(DataError, match="carries no tokenizer"):
        received_tokenizer(text_config(tokenizer="file", tokenizer_path="/server/tok.json"), {})
