"""`fedsim run --client-app MODULE:ATTR`: the ClientApp object a user names, for every virtual node."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from flwr.clientapp import ClientApp

from shared.errors import FedsimError


class ClientAppNotFound(FedsimError, ValueError):
    """`--client-app MODULE:ATTR` names no ClientApp that can be imported."""


@dataclass(frozen=True)
class ImportedClientApp:
    """The ClientApp object at `MODULE:ATTR` (MODULE importable here or from the current
    directory), imported when called: a picklable factory, so each worker imports it itself."""

    reference: str

    def __call__(self) -> ClientApp:
        module_name, _, attr = self.reference.partition(":")
        if not module_name or not attr:
            raise ClientAppNotFound(f"--client-app '{self.reference}': expected MODULE:ATTR")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # first, as `python -m` finds modules of the current directory
        try:
            app = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ClientAppNotFound(f"--client-app '{self.reference}': {err}") from None
        if not isinstance(app, ClientApp):
            raise ClientAppNotFound(f"--client-app '{self.reference}' is a {type(app).__name__}, not a ClientApp")
        return app
