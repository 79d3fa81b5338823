"""Worker processes against real engines, and the images they run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import Settings, load_settings
from datastore.base import CallRecord, open_datastore
from mq.base import open_queue
from tests.rig import RedisServer

REPO = Path(__file__).resolve().parents[2]
FNQ = str(Path(sys.executable).parent / "fnq")
FNQ_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def images(docker_engine: object) -> None:
    """The function images, built (or found cached) once per session."""
    tests = sorted(str(p) for p in (REPO / "tests/functions").iterdir() if p.is_dir())
    dirs = [str(REPO / "scripts/functions/example"), *tests]
    subprocess.run([FNQ, "images", "build", *dirs], check=True, capture_output=True, timeout=900)


@dataclass
class Cluster:
    """Shared queue and datastore URLs, and the worker processes using them."""

    env: dict[str, str]
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        overrides = {k[3:].lower(): v for k, v in self.env.items() if k.startswith("FN_")}
        return load_settings(**overrides)

    def start_worker(
        self,
        *args: str,
        open_files: tuple[int, int] | None = None,
        wrapper: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A worker process; ``open_files``: its soft and hard descriptor limits;
        ``wrapper``: a command that runs it (``ip netns exec NAME``, say); ``env``:
        variables that differ from the cluster's."""
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        command = [*wrapper, FNQ, "worker", *args]
        if open_files is not None:
            soft, hard = open_files
            command = ["prlimit", f"--nofile={soft}:{hard}", "--", *command]
        proc = subprocess.Popen(command, env={**self.env, **(env or {})}, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def stop_all(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def tear_down(self) -> None:
        """Kill the workers, and remove the containers they leave behind."""
        self.stop_all(signal.SIGKILL)
        tag = self.env["FN_CONTAINER_LABEL_TAG"]
        found = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=fnq.classifier={tag}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if found.stdout.split():
            subprocess.run(["docker", "rm", "-f", *found.stdout.split()],
                           capture_output=True, timeout=120, check=False)  # fmt: skip

    def logs(self) -> str:
        files = sorted(self.tmp.glob("worker-*.log"))
        return "\n".join(p.read_text(errors="replace") for p in files)

    def fnq(
        self, *args: str, input_: bytes | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one fnq command (``env``: its environment, if not the cluster's). One that
        does not end within FNQ_TIMEOUT_S is sent SIGUSR1 if it is a worker (which logs
        its tasks' awaits, worker.dump), then SIGABRT, so that its stderr ends with every
        thread's stack (faulthandler)."""
        env = {**(env or self.env), "PYTHONFAULTHANDLER": "1"}
        stdin = None if input_ is None else subprocess.PIPE
        text = None if input_ is None else input_.decode()
        with subprocess.Popen(
            [FNQ, *args], env=env, stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ) as proc:  # fmt: skip
            try:
                out, err = proc.communicate(text, timeout=FNQ_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                if args[:1] == ("worker",):
                    proc.send_signal(signal.SIGUSR1)
                    time.sleep(1)
                proc.send_signal(signal.SIGABRT)
                try:
                    out, err = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                raise subprocess.TimeoutExpired(proc.args, FNQ_TIMEOUT_S, out, err) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    async def register(self, fn: Function) -> None:
        store = await open_datastore(self.settings)
        try:
            await store.create_fn(fn)
        finally:
            await store.close()

    async def enqueue(self, calls: list[Call]) -> None:
        queue = open_queue(self.settings.mq_url, self.settings)
        store = await open_datastore(self.settings)
        try:
            for call in calls:
                await store.record_queued(call)
            await queue.push_many(calls)
        finally:
            await queue.close()
            await store.close()

    async def wait_final(self, ids: list[str], timeout_s: float = 120) -> dict[str, CallRecord]:
        store = await open_datastore(self.settings)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                recs = {i: await store.get_call(i) for i in ids}
                done = {i: r for i, r in recs.items() if r is not None and r.status.is_final}
                if len(done) == len(ids):
                    return done
                if time.monotonic() > deadline:
                    missing = [i for i in ids if i not in done]
                    raise AssertionError(
                        f"{len(missing)} of {len(ids)} calls not final after {timeout_s}s; "
                        f"first: {recs[missing[0]]}\n--- worker logs ---\n{self.logs()[-4000:]}"
                    )
                await asyncio.sleep(0.2)
        finally:
            await store.close()

    async def log_of(self, call_id: str) -> bytes | None:
        store = await open_datastore(self.settings)
        try:
            return await store.get_log(call_id)
        finally:
            await store.close()


def make_calls(app: str, fn: str, n: int, body: bytes = b"hi") -> list[Call]:
    return [Call(id=new_call_id(), app=app, fn=fn, body=body) for _ in range(n)]


def base_env(tmp: Path, mq_url: str, db_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FN_")}
    env.update(
        {
            "FN_DATA_DIR": str(tmp / "data"),
            "FN_MQ_URL": mq_url,
            "FN_MQ_RESERVATION_MSECS": "3000",
            "FN_SHUTDOWN_GRACE_MSECS": "20000",
            "FN_LOG_LEVEL": "INFO",
            "FN_ASYNC_CHEW_POLL_MSECS": "1000",
            # Each test's own label, so that the containers its killed workers
            # leave can be removed after it (a live worker would sweep them).
            "FN_CONTAINER_LABEL_TAG": f"fnqt{new_call_id()[-8:].lower()}",
        }
    )
    if db_url:
        env["FN_DB_URL"] = db_url
    return env


@pytest.fixture
def redis_cluster(tmp_path: Path, redis_server: RedisServer, images: None) -> Iterator[Cluster]:
    prefix = f"t{new_call_id()[-8:].lower()}"
    cluster = Cluster(base_env(tmp_path, f"{redis_server.url}?prefix={prefix}"), tmp_path)
    yield cluster
    cluster.tear_down()


@pytest.fixture
def sqlite_cluster(tmp_path: Path, images: None) -> Iterator[Cluster]:
    cluster = Cluster(base_env(tmp_path, f"sqlite:///{tmp_path / 'data' / 'mq.db'}"), tmp_path)
    yield cluster
    cluster.tear_down()


def by_status(records: dict[str, CallRecord]) -> dict[CallStatus, int]:
    out: dict[CallStatus, int] = {}
    for rec in records.values():
        out[rec.status] = out.get(rec.status, 0) + 1
    return out
