"""10,000 registered virtual clients, 100 a round: memory follows the sample, sampling the seed."""

import pytest

from shared.config import RunConfig
from simulations import engine, runner
from simulations.grid import InProcessGrid


class RecordingGrid(InProcessGrid):
    """The runner's grid, remembering which nodes each push addressed."""

    instances: list["RecordingGrid"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pushed: list[list[int]] = []
        RecordingGrid.instances.append(self)

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed.append([m.metadata.dst_node_id for m in messages])
        return super().push_messages(messages)


@pytest.fixture
def recording_grid(monkeypatch):
    RecordingGrid.instances = []
    monkeypatch.setattr(runner, "InProcessGrid", RecordingGrid)
    return RecordingGrid.instances


def scale_config(seed: int) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "num-clients": 10_000,
            "clients-per-round": 100,
            "eval-clients": 100,
            "rounds": 2,
            "hidden": "8",
            "synthetic-max-samples": 60,
            "seed": seed,
            "vectorized": "off",
        }
    )


def test_ten_thousand_clients_keep_state_only_for_sampled_nodes(tmp_path, recording_grid):
    result = engine.run_simulation(scale_config(0), tmp_path / "run", progress=False)

    (grid,) = recording_grid
    assert result.summary["rounds"] == 2
    assert all(len(nodes) == 100 for nodes in grid.pushed)  # 2 rounds x (train, evaluate)
    assert len(grid._contexts) <= 4 * 100  # Contexts only for nodes ever addressed, not 10,000


def test_client_sampling_is_reproducible_under_seed(tmp_path, recording_grid):
    for i, seed in enumerate((5, 5, 6)):
        engine.run_simulation(scale_config(seed).replace(rounds=1), tmp_path / str(i), progress=False)

    first, again, other = (g.pushed for g in recording_grid)
    assert first == again
    assert first != other
