"""The nginx configuration of docs/deploy.md, run: devices train through it, and nothing but the
Fleet API gets through, however the path is spelled.

nginx is installed with apt-get where it is missing and this test runs as root; elsewhere the
test is skipped, saying why. The configuration is read from docs/deploy.md itself, with only
its paths and ports replaced, so the documented text is what is tested.
"""

from __future__ import annotations

import http.client
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from fedserver.checkpoints import read_metrics
from fedserver.state import StateDir
from shared.processes import free_port, recorded_process, wait_for_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEPLOY_DOC = REPO / "docs" / "deploy.md"
DOCUMENTED = {  # what the documented configuration names, and what it becomes here
    "listen": "listen 443 ssl;",
    "pki": "/srv/flowerbed/pki",
    "upstream": "127.0.0.1:9092",
}
# Paths a device must never reach through the proxy: the other APIs, and ways of spelling them
# from under /v1/fleet/ (dot segments, percent-encoded dots and slashes, double encoding).
FORBIDDEN = (
    "/v1/control/list-runs",
    "/v1/runtime/acquire-task",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/x/../../control/list-runs",
    "/v1/fleet/./../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs",
    "/v1/fleet/..%2fcontrol/list-runs",
    "/v1/fleet%2f..%2fcontrol/list-runs",
    "/v1/fleet/%252e%252e/control/list-runs",
    "/v1/fleet/%2e%2e%2f%2e%2e%2fv1%2fcontrol%2flist-runs",
    "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet/pull-messages?x=/../../control/list-runs",
    "/",
)
SAMPLES = 100
OVERSIZED = 128 << 20  # bytes of a body with no node credentials, streamed at most this far
MEMORY_MARGIN_KB = 50 << 10  # what the SuperLink's memory may move by while nginx refuses it


def nginx_binary() -> str:
    """nginx, installed with apt-get if it is missing and we may; otherwise the test is skipped."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("nginx is not installed, and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", "nginx"], env=env, capture_output=True, text=True, timeout=600
    )
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not found:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        pytest.skip(f"apt-get install nginx failed: {lines[-1]}")
    return found


def documented_config() -> str:
    """The `server { ... }` block of docs/deploy.md's nginx section."""
    block = re.search(r"```nginx\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    assert block, f"{DEPLOY_DOC} has no nginx block"
    return block.group(1)


def local_config(work: Path, pki: Path, listen_port: int, upstream: str) -> str:
    """The documented server block on 127.0.0.1:`listen_port` in front of `upstream`, with `pki`."""
    server = documented_config()
    for key, value in DOCUMENTED.items():
        assert value in server, f"the documented nginx configuration no longer has {value!r}"
    server = server.replace(DOCUMENTED["listen"], f"listen 127.0.0.1:{listen_port} ssl;")
    server = server.replace(DOCUMENTED["pki"], str(pki)).replace(DOCUMENTED["upstream"], upstream)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "\n".join(f"    {kind}_temp_path {work / kind};" for kind in kinds)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's private temp dirs
    return (
        f"{user}worker_processes 1;\npid {work / 'nginx.pid'};\nerror_log {work / 'error.log'};\n"
        f"events {{}}\nhttp {{\n    access_log {work / 'access.log'};\n{temp}\n{server}}}\n"
    )


def post(port: int, path: str, ca: Path) -> int:
    """POST `path`, sent exactly as written (no client-side normalisation), over TLS; the status."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


def post_oversized(port: int, ca: Path, size: int = OVERSIZED, chunk: int = 1 << 20) -> int:
    """POST a `size`-byte body to /v1/fleet/push-object with no node credentials, over TLS,
    streamed `chunk` at a time until the server answers or all is sent; the status it answers."""
    head = (
        "POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/protobuf\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(head.encode())
            sent, block, answer = 0, bytes(chunk), b""
            try:
                while sent < size and not (answer := _answer_so_far(tls)):  # stop once it answers
                    tls.sendall(block[: size - sent])
                    sent += min(chunk, size - sent)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # it closed the connection on us: its answer is still there to read
            return int((answer or tls.recv(1024)).split()[1])  # "HTTP/1.1 413 ..."


def _answer_so_far(tls: ssl.SSLSocket) -> bytes:
    """What the server has answered yet, without waiting (b"" for none, or only TLS session tickets)."""
    if not select.select([tls], [], [], 0)[0]:
        return b""
    timeout = tls.gettimeout()
    tls.setblocking(False)
    try:
        return tls.recv(1024)
    except ssl.SSLWantReadError:
        return b""
    finally:
        tls.settimeout(timeout)


def memory_kb(pid: int, key: str) -> int:
    """A /proc/PID/status entry in kB: VmRSS (resident now) or VmHWM (the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {key}")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, e2e) -> dict:
    """A daemon on 127.0.0.1, the documented nginx in front of it, two devices through nginx."""
    nginx = nginx_binary()
    work = tmp_path_factory.mktemp("proxy")
    pki = work / "pki"
    assert e2e.run_cli(["fedserver.cli", "init", str(pki), "--clients", "2"]).returncode == 0
    parts, server_data = e2e.write_partitions(work, 2, SAMPLES)
    config = work / "run.toml"
    config.write_text(e2e.run_toml(server_data, 2, 3))
    state = StateDir(work / "state")
    daemon_port, proxy_port = free_port(), free_port()
    e2e.start_daemon("proxy-fedserver", pki, config, state, f"127.0.0.1:{daemon_port}")
    nginx_dir = work / "nginx"
    nginx_dir.mkdir()
    (nginx_dir / "nginx.conf").write_text(local_config(nginx_dir, pki, proxy_port, f"127.0.0.1:{daemon_port}"))
    proxy = e2e.start("nginx", [nginx, "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"), "-g", "daemon off;"])
    assert wait_for_port("127.0.0.1", proxy_port, 30, alive=proxy), e2e.log("nginx") + _read(nginx_dir / "error.log")
    for k, part in enumerate(parts, start=1):
        key = pki / "clients" / f"client-{k}.key"
        e2e.start_fedclient(f"proxied-client-{k}", f"127.0.0.1:{proxy_port}", pki, key, part)
    return {"state": state, "pki": pki, "proxy_port": proxy_port, "daemon_port": daemon_port, "nginx": nginx_dir}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_devices_train_through_the_documented_nginx_configuration(proxied, e2e):
    rows = e2e.wait_until(lambda: len(read_metrics(proxied["state"].run_dir)) >= 3 and read_metrics(
        proxied["state"].run_dir), 300, f"3 rounds through nginx (see {e2e.logs})")

    assert [row["round"] for row in rows] == [1, 2, 3]  # type: ignore[union-attr]
    assert "/v1/fleet/pull-messages" in _read(proxied["nginx"] / "access.log")  # they did go through nginx


@pytest.mark.parametrize("path", FORBIDDEN)
def test_the_proxy_answers_404_to_everything_but_the_fleet_api(proxied, path):
    assert post(proxied["proxy_port"], path, proxied["pki"] / "ca.pem") == 404


def test_the_control_api_is_there_behind_the_proxy(proxied):
    # What the proxy hides is served by the daemon itself: the 404s above are the proxy's doing
    assert post(proxied["daemon_port"], "/v1/control/list-runs", proxied["pki"] / "ca.pem") != 404


def test_a_large_body_without_credentials_is_refused_by_the_proxy_before_the_superlink_reads_it(proxied):
    superlink = recorded_process(proxied["state"].superlink_pid)
    assert superlink, "the daemon's SuperLink is not running"
    before = {key: memory_kb(superlink, key) for key in ("VmRSS", "VmHWM")}

    status = post_oversized(proxied["proxy_port"], proxied["pki"] / "ca.pem")

    after = {key: memory_kb(superlink, key) for key in ("VmRSS", "VmHWM")}
    assert status == 413
    grew = {key: after[key] - before[key] for key in before}
    assert all(kb < MEMORY_MARGIN_KB for kb in grew.values()), f"the SuperLink's memory grew (kB): {grew}"
