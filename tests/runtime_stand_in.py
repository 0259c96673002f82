"""A stand-in for a SuperNode's Runtime API on 127.0.0.1, for the tests of who answers the warm
worker: it hands out a task to every request, counts the connections it accepts and records each
request it gets. With a certificate it speaks TLS with it (the real SuperNode's, or an
impostor's own); without, plain HTTP."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskResponse
from flwr.proto.task_pb2 import Task

TOKEN = "a-task-token"


class StandInRuntimeApi(ThreadingHTTPServer):
    """Serves on `port` (0: any free one); OSError while another process holds the port."""

    def __init__(self, certificate: tuple[Path, Path] | None, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _TaskHandler)
        self.context: ssl.SSLContext | None = None
        if certificate is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*certificate)
        self.connections = 0
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def get_request(self) -> tuple[object, object]:
        sock, address = self.socket.accept()
        self.connections += 1
        if self.context is None:
            return sock, address
        try:
            return self.context.wrap_socket(sock, server_side=True), address  # the TLS handshake
        except OSError:
            sock.close()
            raise

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class _TaskHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        body = AcquireTaskResponse(task=Task(), token=TOKEN).SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass
