"""Shared pieces of the agent and end-to-end benchmarks.

* :class:`Section` - what one benchmark measured: tables, notes and target
  checks; printed to the console and rendered as Markdown by ``bench.__main__``.
* :func:`raw_calls` - the ceiling: a minimal HTTP/1.1 client on a function's
  unix socket, with the same request the worker sends (``POST /call`` with
  ``Fn-Call-Id`` and ``Fn-Deadline``).
* :func:`docker_run_one_call` - the ``docker run`` baseline: start the image
  with the socket directory mounted, wait for the socket, make one call.
* :func:`no_gc` - the benchmark process's garbage collector paused over a timed
  run, so that the producer or client it plays does not stop in the middle.
* helpers for settings, medians, percentiles, process RSS, leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.settings import Settings, load_settings
from worker.agent.driver import FN_LISTENER, IOFS_MOUNT, SOCKET_NAME

REPO = Path(__file__).resolve().parents[1]
FNQ = str(REPO / ".venv" / "bin" / "fnq")
LABEL_PREFIX = "fnq-bench-"

REQUEST_TEMPLATE = (
    "POST /call HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    "Fn-Call-Id: {call_id}\r\nFn-Deadline: 2099-01-01T00:00:00.000Z\r\n"
    "Content-Length: {length}\r\n\r\n"
)


# ------------------------------------------------------------------- results


@dataclass
class Check:
    label: str
    value: str
    target: str
    met: bool


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def check(self, label: str, value: str, target: str, met: bool) -> None:
        self.checks.append(Check(label, value, target, met))

    def print(self) -> None:
        print(f"\n== {self.title}")
        for table in self.tables:
            print(f"\n{table.title}")
            print(_text_table(table))
        if self.checks:
            print("\ntargets")
            for c in self.checks:
                verdict = "met" if c.met else "NOT met"
                print(f"  {c.label:<44} {c.value:>18}  target {c.target:<14} {verdict}")
        for note in self.notes:
            print(f"  note: {note}")

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        for note in self.notes:
            out += [note, ""]
        for table in self.tables:
            out += [f"**{table.title}**", "", _md_table(table.columns, table.rows), ""]
        if self.checks:
            rows = [
                [c.label, c.value, c.target, "met" if c.met else "**not met**"] for c in self.checks
            ]
            out += ["**Targets**", "", _md_table(["what", "measured", "target", ""], rows), ""]
        return "\n".join(out)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _text_table(table: Table) -> str:
    cells = [table.columns] + [[fmt(v) for v in row] for row in table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.columns))]
    lines = []
    for n, row in enumerate(cells):
        parts = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        lines.append("  " + "  ".join(parts))
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join([head, sep, *body])


# ------------------------------------------------------------------ numbers


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause this process's garbage collector for a timed run.

    This process is the producer (or the raw client) of the runs it times. It
    holds every call and record of the runs before, so a full collection here
    takes 30-60 ms: a producer stopped that long pushes the calls it owes all at
    once afterwards, and the worker is timed on a burst the load never meant.
    What the run allocates is freed by reference counting; cycles wait for the
    collection at the end.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------- settings


def label_tag() -> str:
    return f"{LABEL_PREFIX}{secrets.token_hex(4)}"


def bench_settings(data_dir: Path, tag: str, **overrides: Any) -> Settings:
    """Defaults plus a classifier label of this run, so its containers can be cleaned up."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "container_label_tag": tag,
        "log_level": "WARNING",
        "hot_start_timeout_msecs": 20_000,
    }
    values.update(overrides)
    return load_settings(**values)


def labelled_ids(tag: str) -> list[str]:
    """The ids of the containers (running or not) that carry the classifier ``tag``."""
    return subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=fnq.classifier={tag}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout.split()


def labelled(tag: str) -> int:
    """How many containers carry the classifier ``tag`` (running or not)."""
    return len(labelled_ids(tag))


def remove_labelled(tag: str) -> int:
    """Force-remove every container carrying the classifier ``tag``; how many."""
    ids = labelled_ids(tag)
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False, timeout=120)
    return len(ids)


# --------------------------------------------------------------- raw client


def _request(body: bytes, call_id: str = "raw") -> bytes:
    return REQUEST_TEMPLATE.format(call_id=call_id, length=len(body)).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return await reader.readexactly(length)


async def raw_calls(
    socket_path: str, calls: int, body: bytes, rate: float | None = None
) -> list[float]:
    """``calls`` sequential requests on one kept-alive connection; each latency in seconds.

    With ``rate``, one starts every 1/``rate`` s (or when the last has answered). A
    host that idles between requests answers slower than one kept busy: that is the
    function's time at that pace.
    """
    reader, writer = await asyncio.open_unix_connection(socket_path)
    message = _request(body)
    loop = asyncio.get_running_loop()
    out: list[float] = []
    try:
        start = loop.time()
        for i in range(calls):
            if rate is not None and (delay := start + i / rate - loop.time()) > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            writer.write(message)
            await _read_response(reader)
            out.append(time.perf_counter() - t0)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return out


async def raw_rate(sockets: list[str], calls_each: int, body: bytes, settle: int = 0) -> float:
    """One raw client per socket, all at once, each on one kept-alive connection:
    calls/s over ``calls_each`` timed calls per client, after ``settle`` untimed ones
    on the same connection (a function's first calls on a new connection, and a host
    that just ran something else, answer slower)."""
    message = _request(body)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def calls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for _ in range(n):
            writer.write(message)
            await _read_response(reader)

    try:
        for path in sockets:
            conns.append(await asyncio.open_unix_connection(path))
        if settle:
            await asyncio.gather(*(calls(r, w, settle) for r, w in conns))
        t0 = time.perf_counter()
        await asyncio.gather(*(calls(r, w, calls_each) for r, w in conns))
        return len(conns) * calls_each / (time.perf_counter() - t0)
    finally:
        for _, writer in conns:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def raw_throughput(sockets: list[str], calls_each: int, body: bytes) -> tuple[float, float]:
    """One raw client per socket, all at once: (calls/s, median latency in ms)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(raw_calls(s, calls_each, body) for s in sockets))
    seconds = time.perf_counter() - t0
    lat = [x for r in results for x in r]
    return len(lat) / seconds, 1000 * median(lat)


# ----------------------------------------------------------- docker run once


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def docker_run_trivial(image: str) -> float:
    """Seconds for ``docker run --rm IMAGE true`` (start, exit, removal; no FDK)."""
    t0 = time.perf_counter()
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "true", image],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return time.perf_counter() - t0


def docker_run_one_call(image: str, body: bytes, timeout_s: float = 30.0) -> tuple[float, float]:
    """Start ``image`` with ``docker run --rm -d`` as the agent would (socket directory
    mounted at /tmp/iofs, FN_LISTENER set, no network), wait for the socket, POST one
    call, then remove it.

    Returns (seconds until the answer, seconds including removal).
    """
    tmp = Path(tempfile.mkdtemp(prefix="fnq-bench-run-"))
    tmp.chmod(0o777)
    sock = tmp / SOCKET_NAME
    name = f"fnq-bench-run-{secrets.token_hex(4)}"
    t0 = time.perf_counter()
    try:
        subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "-d",
                "--name",
                name,
                "--network",
                "none",
                "--init",
                "-v",
                f"{tmp}:{IOFS_MOUNT}",
                "-e",
                "FN_FORMAT=http-stream",
                "-e",
                f"FN_LISTENER={FN_LISTENER}",
                "-e",
                "FN_APP_NAME=bench",
                "-e",
                "FN_FN_NAME=run",
                image,
            ],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        while not sock.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{image} made no socket within {timeout_s}s")
            time.sleep(0.001)
        conn = _UnixHTTPConnection(str(sock), timeout_s)
        try:
            headers = {
                "Fn-Call-Id": "run",
                "Fn-Deadline": "2099-01-01T00:00:00.000Z",
                "Content-Type": "application/json",
            }
            for _ in range(200):  # the socket file can appear just before listen()
                try:
                    conn.request("POST", "/call", body=body, headers=headers)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    conn.close()
                    time.sleep(0.002)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{image} answered {resp.status}")
        finally:
            conn.close()
        answered = time.perf_counter() - t0
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    return answered, time.perf_counter() - t0


def env_without_fn() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FN_")}


def run(coro: Any) -> Any:
    """Run ``coro`` on uvloop, as ``fnq worker`` does (worker.cli._common)."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
