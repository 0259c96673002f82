"""The suite keeps off this machine's own deployments: its Flower home is a temporary folder (not
~/.flwr, where a device's SuperNode installs FABs) and no Ray cluster is named to it; its processes'
temporary files stay in its own folders."""

import os
import tempfile
from pathlib import Path

import pytest


def test_the_suite_has_its_own_flower_home_and_no_ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    home = Path(os.environ["FLWR_HOME"])

    assert home.is_relative_to(tmp_path_factory.getbasetemp()) and home.is_dir()
    assert "RAY_ADDRESS" not in os.environ


def test_the_suites_processes_make_their_temporary_files_in_its_own_folders(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.getbasetemp()

    assert Path(os.environ["TMPDIR"]).is_relative_to(base)
    assert Path(tempfile.mkdtemp(prefix="fedclient-")).is_relative_to(base)
