"""``fnq calls retry`` and the request in ``fnq calls show``, on the embedded SQLite stores."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from config.domain import Call, CallStatus, FailureKind, Function, Outcome, new_call_id
from config.settings import load_settings
from datastore.base import open_datastore
from mq.base import Message, open_queue
from worker.cli import cli


def test_retry_pushes_ended_calls_again(settings_env: Path) -> None:
    settings = load_settings()
    failed = Call(new_call_id(), "shop", "resize", b'{"w": 640}', {"X-Trace": "t-7"}, priority=1)
    binary = Call(new_call_id(), "shop", "resize", bytes(range(200, 256)))
    running = Call(new_call_id(), "shop", "resize", b"busy")
    error = Outcome(CallStatus.ERROR, error="boom", failure=FailureKind.FUNCTION, log=b"x\n")

    async def prepare() -> None:
        store, queue = await open_datastore(settings), open_queue(settings.mq_url, settings)
        try:
            await store.create_fn(Function("shop", "resize", "shop/resize:1"))
            await queue.push(failed)  # it ran and was dead-lettered
            msg = await queue.reserve(1)
            assert msg is not None
            await queue.dead_letter(msg, "boom")
            for c in (failed, binary, running):
                await store.record_running(c, 0, "w")
            await store.record_outcome(failed, error, 1, "w")
            await store.record_outcome(binary, error, 1, "w")
        finally:
            await queue.close()
            await store.close()

    asyncio.run(prepare())

    shown = json.loads(CliRunner().invoke(cli, ["calls", "show", failed.id, "--json"]).output)
    assert shown["request"] == {"headers": {"X-Trace": "t-7"}, "priority": 1,
                                "body": '{"w": 640}', "body_encoding": "utf-8"}  # fmt: skip
    human = CliRunner().invoke(cli, ["calls", "show", failed.id]).output
    assert 'request (priority 1)\nX-Trace: t-7\n\n{"w": 640}\n' in human
    assert (
        "<56 bytes of binary data; see --json>"
        in CliRunner().invoke(cli, ["calls", "show", binary.id]).output
    )

    out = CliRunner().invoke(cli, ["calls", "retry", failed.id, running.id, "NOPE", binary.id])
    assert out.exit_code == 1
    assert out.stdout.splitlines() == [failed.id, binary.id]
    assert out.stderr.splitlines() == [
        f"fnq: call {running.id} is still running; cancel it first",
        "fnq: no call NOPE",
    ]

    async def check() -> list[Message]:
        store, queue = await open_datastore(settings), open_queue(settings.mq_url, settings)
        try:
            rec = await store.get_call(failed.id)
            assert rec is not None and (rec.status, rec.attempts) == (CallStatus.QUEUED, 0)
            assert await queue.dead_list(10) == []  # its stale dead letter went
            msgs = [await queue.reserve(1) for _ in range(3)]
            return [m for m in msgs if m is not None]
        finally:
            await queue.close()
            await store.close()

    msgs = asyncio.run(check())
    by_id = {m.call.id: m.call for m in msgs}
    assert set(by_id) == {failed.id, binary.id}
    again = by_id[failed.id]
    assert (again.body, dict(again.headers), again.priority) == (
        failed.body, {"X-Trace": "t-7"}, 1)  # fmt: skip
    assert again.created_at > failed.created_at
    assert by_id[binary.id].body == binary.body

    out = CliRunner().invoke(cli, ["calls", "retry", failed.id])  # queued now
    assert out.exit_code == 1 and "is still queued; cancel it first" in out.stderr
