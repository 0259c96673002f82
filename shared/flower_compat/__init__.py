"""Every non-public Flower symbol, log marker and protocol detail Flowerbed relies on, as plain typed imports.

Flowerbed builds on Flower's public Message API (`flwr.app`, `flwr.serverapp`,
`flwr.serverapp.strategy`, `flwr.clientapp`); what it does not offer comes from one submodule
here per concern, each checked against Flower `CHECKED_AGAINST` by tests/shared/test_flower_compat.py:

- `messages`: Array bytes, message ids, error codes, the wire format of a Message and a Context;
- `runs`: the runs and task identities an in-process Grid hands out;
- `strategy`: the sampling minimums of Flower's strategies;
- `secagg`, `dp`: SecAgg+'s key-share layout; Flower's clipping and noise functions;
- `app_config`: an app directory and its run config, read as `flwr run` reads them, and the manifest Flowerbed writes;
- `http_grid`: the deployed ServerApp's bounded pull of replies (HttpGrid's Runtime client);
- `runtime`: the SuperNode's Runtime API as `flwr-clientapp` speaks it (the warm worker);
- `control`: the SuperLink's Control API as the `flwr` CLI speaks it (the daemon);
- `supernode_log`: what `flower-supernode` logs, where nothing structured says it (imports no Flower);
- `superlink`: the run and node statuses the SuperLink reports, its in-memory database name (imports no Flower);
- `stock_flower`: stock Flower's Ray engine (`backend = "ray"`) and legacy SecAgg+ workflow (benchmarks);
- `fleet`: a device's side of the Fleet API with Flower's SuperNode code (benchmarks);
- `fleet_api`: the SuperLink's side of it, where its web app is built, its state stores tasks and opens
  SQLite sessions, where its objects are kept (the fleet front).

This package imports no Flower (`fedclient start`'s supervisor reads `supernode_log`; `fedserver status`
and the dashboard read `superlink`); each submodule imports only its own concern: `runtime`, `control`,
`stock_flower` and `fleet` import Flower's slow packages (SuperNode runtime, CLI, simulation), which
the ClientApp and fedsim's own backends never import.

Flower >= 1.43 drops the gRPC Fleet and Control APIs, keeping their HTTP variants, which are
all Flowerbed speaks. What that upgrade moves lands in `control` (`ControlHttpClient`,
`CliClientHttpInterceptor`, `flwr.proto.control_pb2`), `runtime` and `fleet` (the Runtime and
Fleet HTTP clients, interceptors and `flwr.proto` messages, today in packages shared with the
gRPC transports), `fleet_api` (the Fleet API's protobuf messages and handlers) and
`supernode_log` (the connection log lines of the SuperNode's Fleet client).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version

FLOWER_VERSION = version("flwr")
CHECKED_AGAINST = "1.41.0"  # the Flower every symbol, marker and detail here was checked against


@contextmanager
def flower_symbols(submodule: str) -> Iterator[None]:
    """Around a submodule's Flower imports: an import that fails names the symbol, `submodule` and both versions."""
    try:
        yield
    except ImportError as err:
        raise ImportError(
            f"Flower {FLOWER_VERSION}: {err.msg}; shared/flower_compat/{submodule}.py was checked against "
            f"Flower {CHECKED_AGAINST} and must follow this version"
        ) from err
