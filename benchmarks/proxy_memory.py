"""The SuperLink's peak memory (VmHWM) for one oversized body without node credentials, sent
through the documented nginx (docs/deploy.md) and, on the same SuperLink, straight to it.

    .venv/bin/python benchmarks/proxy_memory.py [--mib 256]

A bare `flower-superlink` (TLS, node authentication, as `fedserver start` runs it) on
127.0.0.1, nginx with the documented configuration in front of it (the same text
tests/e2e/test_proxy.py runs), one POST to /v1/fleet/push-object each way. Needs nginx.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedserver.daemon import Pki, flower_env, superlink_argv  # noqa: E402
from shared.files import write_secret  # noqa: E402
from fedserver.state import StateDir  # noqa: E402
from shared.pki import init_pki  # noqa: E402
from shared.processes import free_port, spawn, stop_tree, wait_for_port  # noqa: E402
from tests.e2e.test_proxy import local_config, memory_kb, post_oversized  # noqa: E402  (the tested config)


def start_nginx(work: Path, pki: Path, port: int, upstream: str) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not nginx:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    (work / "nginx.conf").write_text(local_config(work, pki, port, upstream))
    process = spawn([nginx, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
    if not wait_for_port("127.0.0.1", port, 30, alive=process):
        raise SystemExit(f"nginx did not start; see {work / 'error.log'}")
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the body (MiB)")
    size = parser.parse_args().mib << 20
    with tempfile.TemporaryDirectory(prefix="flowerbed-proxy-memory-") as tmp:
        work = Path(tmp)
        init_pki(work / "pki", clients=1)
        pki = Pki.load(work / "pki")
        state = StateDir(work / "state")
        state.create()
        write_secret(state.superexec_secret)
        link_port, proxy_port = free_port(), free_port()
        argv = superlink_argv(pki, "127.0.0.1", link_port, state)
        with open(state.superlink_log, "ab") as log:
            superlink = spawn(argv, env=flower_env(state), stdout=log)
        (work / "nginx").mkdir()
        processes = [superlink]
        try:
            if not wait_for_port("127.0.0.1", link_port, 60, alive=superlink):
                raise SystemExit(f"the SuperLink did not start: {state.superlink_log.read_text()[-2000:]}")
            processes.append(start_nginx(work / "nginx", work / "pki", proxy_port, f"127.0.0.1:{link_port}"))
            print(f"body: {size >> 20} MiB, no node credentials, POST /v1/fleet/push-object")
            print(f"SuperLink at rest:       VmRSS {memory_kb(superlink.pid, 'VmRSS') >> 10} MiB")
            for name, port in (("through nginx", proxy_port), ("straight to it", link_port)):
                status = post_oversized(port, pki.ca, size)
                peak = memory_kb(superlink.pid, "VmHWM") >> 10
                print(f"{name + ':':24} HTTP {status}, SuperLink peak VmHWM {peak} MiB")
        finally:
            for process in reversed(processes):
                stop_tree(process, 10.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
