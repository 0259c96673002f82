"""`fedsim run` on a user's own CSV with text class labels: the run keeps the map as labels.json."""

from __future__ import annotations

import json

from simulations import cli
from simulations.engine import LABELS_FILE


def test_a_run_on_text_labels_saves_their_map_with_the_run(tmp_path):
    # Prepare
    data = tmp_path / "iris.csv"
    names = ("virginica", "setosa", "versicolor")
    data.write_text("a,b,label\n" + "\n".join(f"{i % 5},{i % 3},{names[i % 3]}" for i in range(24)) + "\n")
    config = tmp_path / "iris.toml"
    config.write_text(
        f'dataset = "csv"\ndata-path = "{data}"\nnum-clients = 2\nclients-per-round = 2\nrounds = 1\n'
        'hidden = "4"\nvectorized = "off"\n'
    )
    out = tmp_path / "run"

    # Execute
    code = cli.main(["run", "--config", str(config), "--output", str(out), "--quiet"])

    # Assert
    assert code == 0
    assert json.loads((out / LABELS_FILE).read_text()) == {"setosa": 0, "versicolor": 1, "virginica": 2}


def test_a_run_on_integer_labels_writes_no_label_map(tmp_path):
    out = tmp_path / "run"

    code = cli.main(["run", "--set", "rounds=1", "--set", 'hidden="4"', "--set", "num-clients=4",
                     "--set", "clients-per-round=2", "--output", str(out), "--quiet"])  # fmt: skip

    assert code == 0
    assert (out / "summary.json").is_file() and not (out / LABELS_FILE).exists()
