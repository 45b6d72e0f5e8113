"""The search benchmark's timing client: keep-alive requests, Content-Length framing, clear failures."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.bench_search import RawClient


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_POST(self):  # noqa: N802 (the http.server API)
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/close":
            self.close_connection = True
            self.wfile.flush()
            return
        reply = json.dumps({"path": self.path, "echo": json.loads(body), "pad": "x" * 100_000}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_raw_client_reuses_one_connection_and_frames_replies(server):
    client = RawClient(server)
    try:
        for i in range(3):  # replies larger than one recv, on one connection
            status, answer = client.post_json("/search", json.dumps({"i": i}).encode())
            assert status == 201 and answer["echo"] == {"i": i} and answer["path"] == "/search"
            assert len(answer["pad"]) == 100_000
        assert client.buf == b""
    finally:
        client.close()


def test_raw_client_reports_a_closed_connection(server):
    client = RawClient(server)
    try:
        with pytest.raises(ConnectionError):
            client.post_json("/close", b"{}")
    finally:
        client.close()
