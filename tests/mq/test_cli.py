"""``fnq call`` and ``fnq dead`` through click's runner, on SQLite and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import sqlite3
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from config.domain import Call, CallStatus, Outcome, utcnow
from config.settings import load_settings, sqlite_url
from datastore.backend import Write
from datastore.base import open_datastore
from datastore.sqlite import SqliteDatastore
from mq.base import Message, MessageQueue, open_queue
from tests.datastore.test_cli import ISO_MS
from tests.mq.conftest import QueueMaker
from tests.rig import RedisServer, fill_space, remount, small_tmpfs
from worker.cli import cli
from worker.cli import queue as cli_queue

pytestmark = pytest.mark.integration
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "redis"])
def backend(
    request: pytest.FixtureRequest, settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        monkeypatch.setenv("FN_MQ_URL", f"{server.url}?prefix=cli{secrets.token_hex(4)}")
    fnq("fn", "create", "demo", "echo", "--image", "fnq/echo:latest")
    return str(request.param)


def with_queue(work: Callable[[MessageQueue], Awaitable[T]]) -> T:
    async def run() -> T:
        settings = load_settings()
        queue = open_queue(settings.mq_url, settings)
        try:
            return await work(queue)
        finally:
            await queue.close()

    return asyncio.run(run())


def fnq(*args: str, stdin: bytes | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    assert result.exit_code == code, (result.output, result.exception)
    return result.stdout


def take_one(queue: MessageQueue) -> Awaitable[Message | None]:
    return queue.reserve(3.0)


async def ready(queue: MessageQueue) -> int:
    return (await queue.stats()).ready


def test_call_prints_only_the_id_and_queues_the_call(backend: str) -> None:
    out = fnq(
        "call",
        "demo",
        "echo",
        "--body",
        "hi",
        "--header",
        "X-A: 1",
        "--header",
        "Content-Type:text/plain",
        "--priority",
        "2",
        "--id",
        "cli-1",
    )
    assert out == "cli-1\n"
    msg = with_queue(take_one)
    assert msg is not None
    assert (msg.call.id, msg.call.app, msg.call.fn, msg.call.body) == (
        "cli-1",
        "demo",
        "echo",
        b"hi",
    )
    assert dict(msg.call.headers) == {"X-A": "1", "Content-Type": "text/plain"}
    assert msg.priority == 2


def test_call_body_from_file_or_stdin_and_a_delay(backend: str, tmp_path: Path) -> None:
    (tmp_path / "body.bin").write_bytes(b"\x00from file")
    first = fnq("call", "demo", "echo", "--body", f"@{tmp_path / 'body.bin'}").strip()
    second = fnq("call", "demo", "echo", "--body", "-", stdin=b"from stdin").strip()
    third = fnq("call", "demo", "echo", "--delay", "30").strip()
    # not UTF-8: Python has the byte as a lone surrogate; the body is the bytes given
    fourth = fnq("call", "demo", "echo", "--body", "a\udcffb").strip()
    assert len({first, second, third, fourth}) == 4
    assert all(len(i) == 26 for i in (first, second))

    async def check(queue: MessageQueue) -> None:
        got = {m.call.id: m.call.body for m in await queue.reserve_many(5, 2.0)}
        assert got == {first: b"\x00from file", second: b"from stdin", fourth: b"a\xffb"}
        assert (await queue.stats()).delayed == 1

    with_queue(check)


def test_call_rejects_bad_input(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FN_MAX_REQUEST_SIZE", "8")
    for args, message in [
        (["--header", "nocolon"], "fnq: Invalid value for '--header': 'nocolon' is not NAME:VALUE"),
        (
            ["--header", "X-A:1", "--header", "X-A : 2"],
            "fnq: Invalid value for '--header': 'X-A' is given more than once",
        ),
        (["--priority", "3"], "fnq: Invalid value for '--priority': 3 is not in the range"),
        (["--delay", "-1"], "fnq: delay -1.0 is not between 0 and"),
        (["--id", "bad id"], "fnq: id 'bad id' is not 1-128 characters"),
        (["--id", ""], "fnq: id '' is not 1-128 characters"),  # not a new id instead
        (["--wait", "--wait-timeout", "nan"], "fnq: Invalid value for '--wait-timeout': 'nan' is"),
        (["--body", "@/no/such/file"], "fnq: Invalid value for '--body': cannot read /no/such"),
        (["--body", "123456789"], "fnq: body of 9 bytes exceeds the limit of 8 bytes"),
        (["--header", "X:a\x01b"], "fnq: header 'X' must have a one-line string value without"),
        (["--header", "X:a\udcff"], "fnq: 'X:a\\xff' is not UTF-8 text"),
        (["--id", "a\udcff"], "fnq: 'a\\xff' is not UTF-8 text"),
    ]:
        result = CliRunner().invoke(cli, ["call", "demo", "echo", *args])
        assert (result.exit_code, result.stdout) == (2, ""), args
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr

    async def empty(queue: MessageQueue) -> int:
        stats = await queue.stats()
        return stats.ready + stats.delayed

    assert with_queue(empty) == 0


def test_call_of_an_unknown_function_is_refused(backend: str) -> None:
    result = CliRunner().invoke(cli, ["call", "demo", "nosuch", "--body", "x"])
    assert result.exit_code == 1
    assert "no function demo/nosuch" in result.output
    assert with_queue(ready) == 0


def test_call_gets_a_queued_record(backend: str) -> None:
    call_id = fnq("call", "demo", "echo", "--body", "x").strip()
    shown = json.loads(fnq("calls", "show", call_id, "--json"))
    assert (shown["status"], shown["app"], shown["fn"]) == ("queued", "demo", "echo")


def test_calling_an_id_already_queued_keeps_the_first_request(backend: str) -> None:
    fnq("call", "demo", "echo", "--id", "twice-1", "--body", "first", "--header", "X-N:1")
    again = CliRunner().invoke(
        cli, ["call", "demo", "echo", "--id", "twice-1", "--body", "second", "--delay", "5"]
    )
    assert (again.exit_code, again.stdout) == (0, "twice-1\n")
    assert again.stderr == "fnq: call twice-1 was already queued; this request was not queued\n"
    request = json.loads(fnq("calls", "show", "twice-1", "--json"))["request"]
    assert (request["body"], request["headers"]) == ("first", {"X-N": "1"})

    async def take(queue: MessageQueue) -> list[Message]:
        return await queue.reserve_many(5, 1.0)

    assert [(m.call.id, m.call.body) for m in with_queue(take)] == [("twice-1", b"first")]


def test_calling_an_id_another_producer_queued_writes_no_record(backend: str) -> None:
    async def push(queue: MessageQueue) -> None:
        await queue.push(Call(id="api-1", app="demo", fn="echo", body=b"from the api"))

    with_queue(push)  # as the Python producers do: a message, no record
    again = CliRunner().invoke(cli, ["call", "demo", "echo", "--id", "api-1", "--body", "cli"])
    assert (again.exit_code, again.stdout) == (0, "api-1\n")
    assert again.stderr == "fnq: call api-1 was already queued; this request was not queued\n"
    shown = CliRunner().invoke(cli, ["calls", "show", "api-1", "--json"])
    assert (shown.exit_code, shown.stdout) == (1, "")  # the worker that runs it records it
    msg = with_queue(take_one)
    assert msg is not None and msg.call.body == b"from the api"


def test_dead_list_requeue_purge(backend: str) -> None:
    async def bury(queue: MessageQueue) -> None:
        await queue.push_many([Call(id=f"d{i}", app="demo", fn="echo") for i in range(3)])
        for msg in await queue.reserve_many(3, 2.0):
            await queue.dead_letter(msg, f"reason {msg.call.id}")

    with_queue(bury)
    rows = json.loads(fnq("dead", "list", "--json"))
    assert all(re.fullmatch(ISO_MS, r["died_at"]) for r in rows)  # as records give times
    assert [(r["id"], r["reason"], r["fn"]) for r in rows] == [
        (f"d{i}", f"reason d{i}", "echo") for i in range(3)
    ]
    table = fnq("dead", "list")
    assert "reason d1" in table and "demo/echo" in table
    assert fnq("dead", "requeue", "d0") == "1\n"
    partly = CliRunner().invoke(cli, ["dead", "purge", "d1", "nope"])
    assert (partly.exit_code, partly.stdout) == (1, "1\n")  # d1 purged; "nope" names none
    assert partly.stderr == "fnq: 1 of the ids given named no dead letter\n"
    fnq("dead", "purge", code=2)
    fnq("dead", "purge", "d2", "--all", code=2)

    async def requeued(queue: MessageQueue) -> list[str]:
        return [m.call.id for m in await queue.reserve_many(5, 2.0)]

    assert with_queue(requeued) == ["d0"]
    assert fnq("dead", "purge", "--all") == "1\n"
    assert json.loads(fnq("dead", "list", "--json")) == []


def _end_with_error(call_id: str) -> None:
    """Take ``call_id``'s message, record it ended in error, and dead-letter it."""

    async def run() -> None:
        settings = load_settings()
        store = await open_datastore(settings)
        queue = open_queue(settings.mq_url, settings)
        try:
            msg = await queue.reserve(3.0)
            assert msg is not None and msg.call.id == call_id
            failed = Outcome(CallStatus.ERROR, error="image missing", completed_at=utcnow())
            await store.record_outcome(msg.call, failed, 1, "w")
            await queue.dead_letter(msg, "image missing")
        finally:
            await queue.close()
            await store.close()

    asyncio.run(run())


def test_a_requeued_dead_letter_runs_again_as_a_new_call(backend: str) -> None:
    fnq("call", "demo", "echo", "--body", "again", "--id", "dead-1")
    _end_with_error("dead-1")
    assert json.loads(fnq("calls", "show", "dead-1", "--json"))["status"] == "error"
    assert fnq("dead", "requeue", "dead-1") == "1\n"
    shown = json.loads(fnq("calls", "show", "dead-1", "--json"))
    assert (shown["status"], shown["attempts"], shown["error"]) == ("queued", 0, None)
    msg = with_queue(take_one)
    assert msg is not None and (msg.call.id, msg.call.body) == ("dead-1", b"again")


def test_dead_list_shows_the_attempts_the_record_counts(
    backend: str, settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fnq("call", "demo", "echo", "--id", "ran-1")
    _end_with_error("ran-1")  # its record counts one attempt

    async def bury_unrecorded(queue: MessageQueue) -> None:
        await queue.push(Call(id="bare-1", app="demo", fn="echo"))
        msg = await queue.reserve(3.0)
        assert msg is not None
        await queue.dead_letter(msg, "no record")

    with_queue(bury_unrecorded)
    rows = {r["id"]: r for r in json.loads(fnq("dead", "list", "--json"))}
    assert (rows["ran-1"]["attempts"], rows["bare-1"]["attempts"]) == (1, None)
    assert rows["ran-1"]["deliveries"] == 1
    table = [line.split() for line in fnq("dead", "list").splitlines()]
    assert table[0][:4] == ["ID", "FUNCTION", "DELIVERIES", "ATTEMPTS"]
    assert {row[0]: row[3] for row in table[1:]} == {"ran-1": "1", "bare-1": "-"}
    # Without a datastore the list still comes, says why it has no attempts, makes none.
    missing = settings_env / "nowhere" / "fnq.db"
    monkeypatch.setenv("FN_DB_URL", f"sqlite://{missing}")
    result = CliRunner().invoke(cli, ["dead", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert {r["id"]: r["attempts"] for r in json.loads(result.stdout)} == {
        "ran-1": None,
        "bare-1": None,
    }
    assert result.stderr.startswith("fnq: no attempts shown: ") and "no datastore" in result.stderr
    assert not missing.exists() and not missing.parent.exists()


def test_requeue_of_an_id_that_names_no_dead_letter_leaves_its_record(backend: str) -> None:
    """Its record was reopened all the same: `queued`, its outcome gone, nothing queued."""
    fnq("call", "demo", "echo", "--id", "twice-1")
    _end_with_error("twice-1")
    assert fnq("dead", "purge", "twice-1") == "1\n"  # or requeued already, or mistyped
    result = CliRunner().invoke(cli, ["dead", "requeue", "twice-1"])
    assert (result.exit_code, result.stdout) == (1, "0\n")
    assert result.stderr == "fnq: 1 of the ids given named no dead letter\n"
    shown = json.loads(fnq("calls", "show", "twice-1", "--json"))
    assert (shown["status"], shown["attempts"], shown["error"]) == ("error", 1, "image missing")
    assert with_queue(ready) == 0


def test_requeue_all_reopens_every_ended_call(backend: str) -> None:
    for i in range(3):
        fnq("call", "demo", "echo", "--id", f"all-{i}")
        _end_with_error(f"all-{i}")
    assert fnq("dead", "requeue", "--all") == "3\n"
    for i in range(3):
        assert json.loads(fnq("calls", "show", f"all-{i}", "--json"))["status"] == "queued"
    assert json.loads(fnq("dead", "list", "--json")) == []


def test_requeue_reopens_the_records_of_a_round_in_shared_commits(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit per reopened record made requeueing 10,000 dead letters take 5.8 s
    (1.7 s with the records of each round of 500 reopened together)."""

    async def bury(n: int) -> None:
        settings = load_settings()
        store = await open_datastore(settings)
        queue = open_queue(settings.mq_url, settings)
        try:
            await queue.push_many([Call(f"many-{i}", "demo", "echo") for i in range(n)])
            failed = Outcome(CallStatus.ERROR, error="image missing", completed_at=utcnow())
            for _ in range(n):
                msg = await queue.reserve(3.0)
                assert msg is not None
                await store.record_outcome(msg.call, failed, 1, "w")
                await queue.dead_letter(msg, "image missing")
        finally:
            await queue.close()
            await store.close()

    asyncio.run(bury(20))
    batches: list[int] = []
    real = SqliteDatastore._run_batch

    async def counted(self: SqliteDatastore, ops: list[Any]) -> list[Any]:
        if any(kind is Write.REQUEUE for kind, _, _ in ops):
            batches.append(len(ops))
        return await real(self, ops)

    monkeypatch.setattr(SqliteDatastore, "_run_batch", counted)
    assert fnq("dead", "requeue", "--all") == "20\n"
    assert sum(batches) == 20 and len(batches) <= 10, batches
    assert json.loads(fnq("calls", "show", "many-7", "--json"))["status"] == "queued"


def test_calling_an_id_that_has_ended_points_to_retry(backend: str) -> None:
    fnq("call", "demo", "echo", "--id", "done-1")
    _end_with_error("done-1")
    result = CliRunner().invoke(cli, ["call", "demo", "echo", "--id", "done-1"])
    assert result.exit_code == 1  # not a usage error
    assert "call done-1 has already ended (error); `fnq calls retry done-1`" in result.output
    assert with_queue(ready) == 0


def test_dead_list_names_the_function_a_malformed_message_gives(backend: str) -> None:
    url = load_settings().mq_url
    parts = urllib.parse.urlsplit(url)
    prefix = urllib.parse.parse_qs(parts.query).get("prefix", [""])[0]
    maker = QueueMaker(backend, url, prefix, parts.port or 0)
    with_queue(lambda queue: queue.stats())  # makes the SQLite tables
    if backend == "redis":
        maker.inject_raw({"id": b"m1", "app": b"shop", "fn": b"resize", "dealy": b"3"})
        maker.inject_raw({"id": b"m2", "fn": b"resize", "priority": b"high"})
        maker.inject_raw({"id": b"m3", "body": b"x"})
        maker.inject_raw({"id": b"m4", "app": b"a\nb", "fn": b"c\td"})
    else:
        maker.inject_raw(
            {"payload": b'{"id":"m1","app":"shop","fn":"resize","dealy":3}'}, msg_id="m1"
        )
        maker.inject_raw({"payload": b'{"id":"m2","fn":"resize","priority":"high"}'}, msg_id="m2")
        maker.inject_raw({"payload": b"{nope"}, msg_id="m3")
        maker.inject_raw({"payload": b'{"id":"m4","app":"a\\nb","fn":"c\\td"}'}, msg_id="m4")

    async def reserve(queue: MessageQueue) -> Message | None:
        return await queue.reserve(0.5)

    assert with_queue(reserve) is None  # the malformed messages went to the dead letters
    rows = [line.split() for line in fnq("dead", "list").splitlines()]
    assert rows[0][:2] == ["ID", "FUNCTION"]
    assert {row[0]: row[1] for row in rows[1:]} == {
        "m1": "shop/resize",
        "m2": "?/resize",
        "m3": "?/?",
        "m4": "a\\nb/c\\td",  # one line each: control characters are escaped
    }
    assert all(
        r["reason"].startswith("malformed message")
        for r in json.loads(fnq("dead", "list", "--json"))
    )


def test_call_on_a_full_datastore_disk_is_queued_and_says_its_record_is_not(
    settings_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue takes the call but the datastore's disk is full: the command does not
    wait for room without end. It prints the id, says on stderr that the record could
    not be written and why, and exits 0: the call is queued, and the worker that
    takes it records it."""
    monkeypatch.setattr(cli_queue, "WRITE_PATIENCE_S", 0.3)
    with small_tmpfs(tmp_path / "db", "size=2m") as directory:
        path = directory / "fnq.db"
        monkeypatch.setenv("FN_DB_URL", sqlite_url(path))
        fnq("fn", "create", "demo", "echo", "--image", "fnq/echo:latest")
        # A worker has the datastore open (its -shm file is there, which a command
        # could not make on a full disk), and a write must grow its -wal file.
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as worker:
            worker.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            fill_space(directory)
            result = CliRunner().invoke(cli, ["call", "demo", "echo", "--body", "x" * 65536])
        call_id = result.stdout.strip()
        assert result.exit_code == 0, (result.output, result.exception)
        assert result.stderr.startswith(
            f"fnq: call {call_id} is queued, but its record could not be written ("
        ), result.stderr
        assert "database or disk is full" in result.stderr
        msg = with_queue(take_one)
        assert msg is not None and msg.call.id == call_id


def test_requeue_with_a_read_only_log_directory_leaves_that_call_dead(
    backend: str, settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's old log cannot be deleted from a read-only file system (a real tmpfs
    remounted read-only): one line names the call, the directory and the error; that
    dead letter stays dead and its record ended, its old log still its own, while the
    other dead letter is requeued. Once the directory is writable, the same command
    requeues it, its old log gone."""
    with small_tmpfs(settings_env / "logs", "size=256k") as logs:
        monkeypatch.setenv("FN_LOG_URL", f"file://{logs}")
        for call_id in ("ro-1", "ok-1"):
            fnq("call", "demo", "echo", "--id", call_id)
            _end_with_error(call_id)
        old_log = fnq("logs", "ro-1")
        (logs / "_1" / "ok-1.log").unlink()  # gone already: nothing to delete
        remount(logs, "ro")
        try:
            result = CliRunner().invoke(cli, ["dead", "requeue", "ro-1", "ok-1"])
        finally:
            remount(logs, "rw")
        assert (result.exit_code, result.stdout) == (1, "1\n"), (result.output, result.exception)
        assert result.stderr == (
            f"fnq: dead letter ro-1 not requeued: deleting the log of call ro-1 in {logs} "
            f"failed: [Errno 30] Read-only file system: '{logs}/_1/ro-1.log'; call ro-1 "
            "stays error\n"
        )
        assert [d["id"] for d in json.loads(fnq("dead", "list", "--json"))] == ["ro-1"]
        shown = json.loads(fnq("calls", "show", "ro-1", "--json"))
        assert (shown["status"], shown["attempts"]) == ("error", 1)
        assert fnq("logs", "ro-1") == old_log
        assert json.loads(fnq("calls", "show", "ok-1", "--json"))["status"] == "queued"
        msg = with_queue(take_one)
        assert msg is not None and msg.call.id == "ok-1"

        assert fnq("dead", "requeue", "--all") == "1\n"
        shown = json.loads(fnq("calls", "show", "ro-1", "--json"))
        assert (shown["status"], shown["attempts"]) == ("queued", 0)
        assert not (logs / "_1" / "ro-1.log").exists()
        msg = with_queue(take_one)
        assert msg is not None and msg.call.id == "ro-1"


def test_requeue_all_passes_over_the_dead_letters_it_leaves_dead(
    backend: str, settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With rounds of two, the one dead letter whose old log cannot be deleted (a
    read-only tmpfs) stays the oldest; each later round lists past it, and every
    other dead letter is requeued."""
    monkeypatch.setattr(cli_queue, "REQUEUE_ROUND", 2)
    with small_tmpfs(settings_env / "logs", "size=256k") as logs:
        monkeypatch.setenv("FN_LOG_URL", f"file://{logs}")
        ids = [f"r-{i}" for i in range(5)]
        for call_id in ids:
            fnq("call", "demo", "echo", "--id", call_id)
            _end_with_error(call_id)
        for call_id in ids[1:]:
            next(logs.rglob(f"{call_id}.log")).unlink()
        remount(logs, "ro")
        try:
            result = CliRunner().invoke(cli, ["dead", "requeue", "--all"])
        finally:
            remount(logs, "rw")
        assert (result.exit_code, result.stdout) == (1, "4\n"), (result.output, result.exception)
        assert result.stderr.startswith("fnq: dead letter r-0 not requeued: ")
        assert len(result.stderr.splitlines()) == 1
        assert [d["id"] for d in json.loads(fnq("dead", "list", "--json"))] == ["r-0"]
