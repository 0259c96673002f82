"""`python -m fedclient.localcert CERTIFICATE KEY`: the SuperNode's Runtime API certificate for one `fedclient start`.

A one-shot child of `fedclient start` (fedclient/node.py), so that the long-lived supervisor
never imports `cryptography` (see shared/pki.py, `write_local_certificate`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.pki import write_local_certificate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedclient.localcert", description=__doc__.split("\n")[0])
    parser.add_argument("certificate", type=Path, help="where the self-signed certificate for 127.0.0.1 goes")
    parser.add_argument("key", type=Path, help="where its private key goes (mode 0600)")
    args = parser.parse_args(argv)
    write_local_certificate(args.certificate, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
