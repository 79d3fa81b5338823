"""FN_SENTRY_DSN: the worker's own errors reach Sentry; nothing wraps its per-call I/O."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, logging
import redis.asyncio.client, redis.client
plain = (redis.asyncio.client.Redis.execute_command, redis.client.Redis.execute_command)
import sentry_sdk
from config.settings import load_settings
from worker.runtime import setup_sentry
logging.basicConfig(level=logging.INFO)
setup_sentry(load_settings())
logging.getLogger("fnq.worker").info("worker started")
logging.getLogger("fnq.worker").error("the datastore went away")
sentry_sdk.flush(10)
now = (redis.asyncio.client.Redis.execute_command, redis.client.Redis.execute_command)
print(json.dumps({"integrations": sorted(sentry_sdk.get_client().integrations),
                  "redis_wrapped": now != plain}))
"""


class Collector(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        self.bodies.append(data)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[int, list[bytes]]]:
    Collector.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], Collector.bodies
    finally:
        server.shutdown()
        server.server_close()


def test_logged_errors_are_reported_and_no_library_is_wrapped(
    collector: tuple[int, list[bytes]], tmp_path: Path
) -> None:
    port, bodies = collector
    env = {k: v for k, v in os.environ.items() if not k.startswith("FN_")}
    env |= {
        "FN_SENTRY_DSN": f"http://key@127.0.0.1:{port}/1",
        "FN_DATA_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert not seen["redis_wrapped"]
    assert "logging" in seen["integrations"] and "excepthook" in seen["integrations"]
    assert not {"redis", "asyncpg", "aiohttp", "rq", "stdlib", "asyncio"} & set(
        seen["integrations"]
    )
    events = [
        json.loads(line)
        for body in bodies
        for line in body.splitlines()
        if line.startswith(b"{") and b'"logentry"' in line
    ]
    assert [e["logentry"]["message"] for e in events] == ["the datastore went away"]
    crumbs = [c["message"] for c in events[0]["breadcrumbs"]["values"]]
    assert crumbs == ["worker started"]
