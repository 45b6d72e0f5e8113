"""``mm serve`` as a user runs it: a subprocess on a free port, with every log line it writes kept.

The access log is uvicorn's, configured by ``mm serve``: only the real command shows what an operator's
log holds, so the tests that scan logs for secrets run against this rather than ``TestClient``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MM = "import sys; from service.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mm_serve(collection: Path, log_file: Path, env: dict[str, str], model: str = "tiny") -> Iterator[str]:
    """Run ``mm -vv serve`` (debug logging everywhere) with ``env`` added; yields ``http://host:port``.

    stdout and stderr go to ``log_file``, complete once the context exits (the server is stopped).
    """
    import httpx

    port = free_port()
    cmd = [sys.executable, "-c", MM, "-vv", "serve", "--collection", str(collection), "--model", model,
           "--port", str(port), "--log-level", "debug"]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mm serve exited {proc.returncode}: {log_file.read_text()[-800:]}")
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("mm serve did not answer /health in 120 s")
                time.sleep(0.1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
