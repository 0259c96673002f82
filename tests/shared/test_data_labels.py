"""A federation over a CSV whose class labels are text: one map of names to ids for all its clients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.config import RunConfig
from shared.data import DataError
from shared.data.federation import load_federation, load_local

NAMES = ("virginica", "setosa", "versicolor")


def write_iris_like(path: Path, rows: int = 30) -> Path:
    """Row i: feature i, class NAMES[i % 3] (so a feature names its row's class)."""
    lines = ["index,width,label"] + [f"{i},{i % 7 / 10},{NAMES[i % 3]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_client_of_a_text_labelled_csv_shares_the_files_map(tmp_path):
    # Prepare
    path = write_iris_like(tmp_path / "iris.csv")
    cfg = RunConfig.from_mapping({"dataset": "csv", "data-path": str(path), "num-clients": 3, "clients-per-round": 3,
                                  "partition": "dirichlet", "dirichlet-alpha": 0.1})  # fmt: skip

    # Execute
    federation = load_federation(cfg)

    # Assert
    assert federation.classes == ("setosa", "versicolor", "virginica")
    assert federation.spec.num_classes == 3
    for k in range(federation.num_clients):
        data = federation.client(k)
        for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
            assert [federation.classes[label] for label in y] == [NAMES[int(row) % 3] for row in x[:, 0]]


def test_a_deployed_client_refuses_text_labels_it_cannot_map_alone(tmp_path):
    path = write_iris_like(tmp_path / "iris.csv")

    with pytest.raises(DataError, match="text class labels \\(e.g. 'setosa'\\) are mapped to ids in fedsim only"):
        load_local(path, RunConfig.from_mapping({"dataset": "csv"}))


def test_a_deployed_client_keeps_integer_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("f,label\n" + "\n".join(f"{i},{i % 3}" for i in range(10)) + "\n")

    data = load_local(path, RunConfig.from_mapping({"dataset": "csv"}))

    assert sorted(np.concatenate([data.y_train, data.y_test]).tolist()) == sorted(i % 3 for i in range(10))
