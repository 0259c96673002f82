"""The shape the three command lines share: --version, a description on every --help page, one-line
errors with the exit status of shared.errors.ExitCode, and --config wherever a config is taken."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedclient import cli as fedclient_cli
from fedclient.node import NodeError, NodeRefused
from fedserver import cli as fedserver_cli
from fedserver.app import RoundFailed
from fedserver.checkpoints import CheckpointError
from fedserver.control import ControlError
from fedserver.state import DaemonError
from shared.cli import package_version, run_cli
from shared.config import ConfigError
from shared.data.errors import DataError
from shared.errors import ExitCode, FedclientError, FedserverError, FedsimError, FlowerbedError
from shared.pki import PkiError
from shared.secagg import SecAggError
from shared.weights import InvalidUpdate
from simulations import cli as fedsim_cli
from simulations.engine import OutputExists
from simulations.plotter import PlotError

CLIS: dict[str, tuple[Callable[[list[str]], int], list[str]]] = {
    "fedserver": (fedserver_cli.main, list(fedserver_cli.COMMANDS)),
    "fedclient": (fedclient_cli.main, ["start"]),
    "fedsim": (fedsim_cli.main, ["run"]),
}
PAGES = [(prog, []) for prog in CLIS] + [(prog, [command]) for prog, (_, commands) in CLIS.items() for command in commands]


@pytest.mark.parametrize("prog", CLIS)
def test_version_prints_the_package_version(prog, capsys):
    # Execute
    code = CLIS[prog][0](["--version"])

    # Assert
    assert code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {package_version()}"


def test_the_package_version_is_the_installed_one():
    assert package_version() not in ("", "unknown")


@pytest.mark.parametrize(("prog", "command"), PAGES, ids=[" ".join([p, *c]) for p, c in PAGES])
def test_every_help_page_has_a_description(prog, command, capsys):
    # Execute
    code = CLIS[prog][0]([*command, "--help"])

    # Assert
    assert code == 0
    paragraphs = capsys.readouterr().out.split("\n\n")
    assert paragraphs[0].startswith(f"usage: {' '.join([prog, *command])}")
    description = paragraphs[1]
    assert description.strip() and not description.startswith(("options:", "positional arguments:")), paragraphs


@pytest.mark.parametrize("prog", CLIS)
@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["--bogus"]])
def test_bad_arguments_are_one_line_exit_2(prog, argv, capsys):
    # Execute
    code = CLIS[prog][0](argv)

    # Assert
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE == 2
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert f"(see '{prog} --help')" in err


@pytest.mark.parametrize("flag", [[], ["--config"]])
def test_fedsim_run_takes_the_config_positionally_or_with_config(tmp_path, capsys, flag):
    # Prepare: a config whose error names the file, so the test stops before any training
    config = tmp_path / "bad.toml"
    config.write_text('strategy = "fedfoo"\n')

    # Execute
    code = fedsim_cli.main(["run", *flag, str(config), "--output", str(tmp_path / "out")])

    # Assert
    assert code == 2
    assert "'strategy' is 'fedfoo'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "a.toml", "--config", "b.toml"], "give the config once"),
        (["run", "--config", "a.toml", "--resume", "DIR"], "--resume DIR takes its config and output from DIR"),
    ],
)
def test_fedsim_refuses_ambiguous_configs_in_one_line(argv, message, capsys):
    # Execute
    code = fedsim_cli.main(argv)

    # Assert
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_fedserver_start_takes_config():
    args = fedserver_cli.build_parser().parse_args(["start", "--pki", "pki", "--config", "run.toml"])

    assert str(args.config) == "run.toml"


class _Failed(FedserverError):
    exit_code = ExitCode.FAILED


def _raising(error: BaseException) -> Callable[[], int]:
    def main() -> int:
        raise error

    return main


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConfigError("bad key"), ExitCode.USAGE),
        (DataError("bad file"), ExitCode.USAGE),
        (PkiError("bad pki"), ExitCode.USAGE),
        (FedsimError("bad output"), ExitCode.USAGE),
        (FedclientError("bad file"), ExitCode.USAGE),
        (_Failed("round 3 failed"), ExitCode.FAILED),
        (PermissionError(13, "Permission denied", "/runs/x"), ExitCode.FAILED),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
    ],
)
def test_run_cli_maps_each_kind_of_error_to_its_exit_status_in_one_line(error, status, capsys):
    # Execute
    code = run_cli("prog", _raising(error))

    # Assert
    err = capsys.readouterr().err
    assert code == status
    assert err.startswith("prog: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_user_error_spanning_lines_is_printed_on_one(capsys):
    assert run_cli("prog", _raising(FlowerbedError("a path\nwith a newline"))) == ExitCode.USAGE

    assert capsys.readouterr().err == "prog: error: a path with a newline\n"


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli("prog", _raising(ZeroDivisionError("bug")))


@pytest.mark.parametrize(
    "error",
    [ConfigError, DataError, PkiError, InvalidUpdate, SecAggError, CheckpointError, RoundFailed, DaemonError,
     ControlError, NodeError, NodeRefused, OutputExists, PlotError],
)  # fmt: skip
def test_every_custom_error_is_a_flowerbed_error_and_keeps_its_builtin_base(error):
    assert issubclass(error, FlowerbedError)
    assert issubclass(error, (ValueError, RuntimeError))
