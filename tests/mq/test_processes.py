"""Several consumer processes on one queue: exactly once without crashes, nothing lost with."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from config.domain import Call, new_call_id
from tests.mq.conftest import QueueMaker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def consumer(url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("FN_")}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.mq.consumer_proc", url, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def deliveries(output: str) -> list[tuple[str, int]]:
    return [
        (p[1], int(p[2]))
        for p in (line.split() for line in output.splitlines())
        if len(p) == 3 and p[0] == "GOT"
    ]


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", line + (proc.stderr.read() if proc.stderr else "")


async def test_n_consumers_get_each_message_exactly_once(queues: QueueMaker) -> None:
    q = queues()
    await q.stats()
    procs = [consumer(queues.url, "ack", "--batch", "7", "--idle-s", "1.5") for _ in range(4)]
    for proc in procs:
        wait_ready(proc)
    sent: list[str] = []
    for start in range(0, 600, 100):
        batch = [Call(new_call_id(), "demo", "echo", b"%d" % i) for i in range(start, start + 100)]
        sent += await q.push_many(batch)
    got: list[tuple[str, int]] = []
    busy = 0
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        mine = deliveries(out)
        busy += bool(mine)
        got += mine
    assert busy >= 2, "the consumers should have shared the work"
    counts = collections.Counter(cid for cid, _ in got)
    assert set(counts) == set(sent)
    assert max(counts.values()) == 1
    assert all(d == 1 for _, d in got)
    stats = await q.stats()
    assert (stats.ready, stats.reserved, stats.dead) == (0, 0, 0)


async def test_killed_consumer_messages_come_back(queues: QueueMaker) -> None:
    q = queues(mq_reservation_msecs=1000)
    sent = await q.push_many([Call(new_call_id(), "demo", "echo", b"%d" % i) for i in range(30)])
    holder = consumer(queues.url, "hold", "--count", "12", "--reservation-ms", "1000")
    try:
        wait_ready(holder)
        assert holder.stdout is not None
        lines = []
        for line in holder.stdout:
            lines.append(line)
            if line.strip() == "HELD":
                break
        held = {cid for cid, _ in deliveries("".join(lines))}
        assert len(held) == 12
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    got: dict[str, int] = {}
    while len(got) < len(sent):
        batch = await q.reserve_many(50, 5.0)
        assert batch, f"lost {set(sent) - set(got)}"
        for msg in batch:
            assert msg.call.id not in got
            got[msg.call.id] = msg.deliveries
        await q.ack_many(batch)
    assert set(got) == set(sent)
    assert {cid for cid, d in got.items() if d == 2} == held
    assert all(got[cid] == 1 for cid in set(sent) - held)
    assert await q.reserve(0.3) is None
