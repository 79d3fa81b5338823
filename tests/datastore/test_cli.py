"""``fnq fn``, ``fnq calls`` and ``fnq logs`` against an embedded datastore in tmp_path."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from config.domain import Call, CallStatus, Outcome, Response, new_call_id
from config.settings import load_settings
from datastore import reading
from datastore.base import open_datastore
from datastore.validate import parse_since
from worker.cli import cli

FNQ = str(Path(sys.executable).parent / "fnq")
ISO_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"  # as every JSON time of fnq reads


def fnq(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def record(calls: list[tuple[Call, Outcome | None]]) -> None:
    async def run() -> None:
        store = await open_datastore(load_settings())
        try:
            for c, outcome in calls:
                await store.record_queued(c, "img:1")
                if outcome is not None:
                    await store.record_outcome(c, outcome, 1, "w")
        finally:
            await store.close()

    asyncio.run(run())


def test_fn_commands(settings_env: Path) -> None:
    out = fnq("fn", "create", "shop", "resize", "--image", "shop/resize:1", "--memory", "256",
              "--timeout", "60", "--config", "MODE=fast", "--config", "LEVEL=3")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "created shop/resize" in out.output

    shown = json.loads(fnq("fn", "show", "shop", "resize", "--json").output)
    assert (shown["image"], shown["memory_mb"], shown["timeout_s"]) == ("shop/resize:1", 256, 60)
    assert re.fullmatch(ISO_MS, shown["created_at"]) and re.fullmatch(ISO_MS, shown["updated_at"])
    assert shown["config"] == {"MODE": "fast", "LEVEL": "3"}

    out = fnq("fn", "update", "shop", "resize", "--idle-timeout", "90", "--config", "MODE=slow",
              "--unset", "LEVEL", "--json")  # fmt: skip
    updated = json.loads(out.output)
    assert updated["idle_timeout_s"] == 90 and updated["config"] == {"MODE": "slow"}
    assert updated["memory_mb"] == 256

    fnq("fn", "create", "blog", "render", "--image", "render:2")
    table = fnq("fn", "list").output.splitlines()
    assert table[0].split()[:3] == ["APP", "NAME", "IMAGE"]
    assert [line.split()[:2] for line in table[1:]] == [["blog", "render"], ["shop", "resize"]]
    assert [f["name"] for f in json.loads(fnq("fn", "list", "blog", "--json").output)] == ["render"]

    assert fnq("fn", "delete", "blog", "render").output.strip() == "deleted blog/render"


NEW = ["fn", "create", "a", "f", "--image", "i:1"]


def test_a_value_with_a_line_break_stays_on_its_line_of_a_table(settings_env: Path) -> None:
    assert fnq(*NEW, "--config", "MOTD=hello\nworld\t!").exit_code == 0
    lines = fnq("fn", "show", "a", "f").output.splitlines()
    assert lines[0].split() == ["FIELD", "VALUE"]
    assert len(lines) == 1 + len(json.loads(fnq("fn", "show", "a", "f", "--json").output))
    assert "config           MOTD=hello\\nworld\\t!" in lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fn", "update", "a", "nope", "--memory", "64"], "no function a/nope"),
        (["fn", "show", "a", "nope"], "no function a/nope"),
        (["fn", "delete", "a", "nope"], "no function a/nope"),
        (["calls", "show", "01ABCDEFGHJKMNPQRSTVWXYZ00"], "no call 01ABCDEFGHJKMNPQRSTVWXYZ00 (a"),
        (["calls", "show", "x-1"], "a malformed message never does: see `fnq dead list`)"),
        (["logs", "01ABCDEFGHJKMNPQRSTVWXYZ00"], "no call 01ABCDEFGHJKMNPQRSTVWXYZ00"),
    ],
)  # fmt: skip
def test_errors_are_one_line(stores_env: Path, args: list[str], message: str) -> None:
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fnq: ") and message in lines[0], out.stderr


READERS = [["calls", "list"], ["calls", "show", "01ABCDEFGHJKMNPQRSTVWXYZ00"],
           ["calls", "wait", "01ABCDEFGHJKMNPQRSTVWXYZ00"], ["logs", "01ABCDEFGHJKMNPQRSTVWXYZ00"],
           ["fn", "list"], ["fn", "show", "a", "f"], ["status"]]  # fmt: skip
# Commands that change only what is there: at a mistyped path they have nothing to change.
CHANGERS = [["calls", "cancel", "X"], ["calls", "retry", "X"], ["calls", "purge", "--older-than",
            "1d"], ["fn", "update", "a", "f", "--memory", "64"], ["fn", "delete", "a", "f"],
            ["dead", "requeue", "X"], ["dead", "requeue", "--all"]]  # fmt: skip


NO_DATASTORE = ("FN_DB_URL", "fnq.db", "no datastore", "a worker or `fnq fn create` creates it")
NO_QUEUE = ("FN_MQ_URL", "mq.db", "no queue", "a worker or `fnq call` creates it")


@pytest.mark.parametrize(
    ("args", "store"),
    [(args, NO_DATASTORE) for args in READERS + CHANGERS]
    + [(["status"], NO_QUEUE), (["dead", "list"], NO_QUEUE)]
    + [
        (["dead", *args], NO_QUEUE)
        for args in (["requeue", "X"], ["purge", "X"], ["purge", "--all"])
    ],
)
def test_a_command_that_reads_or_changes_makes_no_store(
    stores_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    store: tuple[str, str, str, str],
) -> None:
    variable, name, none, hint = store
    missing = stores_env / "mistyped" / name
    monkeypatch.setenv(variable, f"sqlite://{missing}")
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 1
    assert out.stderr.splitlines() == [f"fnq: {none} at {missing} ({variable}); {hint}"]
    assert not missing.parent.exists()


@pytest.mark.parametrize("url", ["", "sqlite:////{path}"])
def test_a_missing_datastore_is_named_by_its_plain_path(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """In the data dir by default, or from a URL with four slashes (SQLAlchemy's form)."""
    missing = settings_env / "data" / "fnq.db"
    monkeypatch.setenv("FN_DB_URL", url.format(path=str(missing).lstrip("/")))
    out = CliRunner().invoke(cli, ["calls", "list"])
    assert out.exit_code == 1
    assert out.stderr.splitlines() == [
        f"fnq: {NO_DATASTORE[2]} at {missing} (FN_DB_URL); {NO_DATASTORE[3]}"
    ]


def test_a_command_that_writes_makes_the_datastore(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = settings_env / "new" / "fnq.db"
    monkeypatch.setenv("FN_DB_URL", f"sqlite://{made}")
    assert fnq("fn", "create", "a", "f", "--image", "i:1").exit_code == 0
    assert made.is_file()
    assert fnq("fn", "list").exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch"], "No such command 'nosuch'."),
        (["--bogus"], "No such option '--bogus'."),
        (["calls", "show"], "Missing argument 'CALL_ID'."),
        (["calls", "list", "--status", "late"], "Invalid value for '--status': 'late' is not one"),
        (["calls", "list", "--limit", "0"], "Invalid value for '--limit': 0 is not in the range"),
        (["fn", "create", "a", "f"], "Missing option '--image'."),
        (["dead", "purge"], "give dead-letter ids or --all (not both)"),
        (["calls", "list", "--since", "lately"], "Invalid value for '--since': 'lately' is"),
        (["calls", "purge", "--older-than", "old"], "Invalid value for '--older-than': 'old'"),
        (["calls", "list", "--since", "999999d"], "Invalid value for '--since': '999999d' is"),
        (["calls", "purge", "--older-than", "99999999999d"], "Invalid value for '--older-than':"),
        (["calls", "list", "--cursor", "%%%"], "Invalid value for '--cursor': '%%%' is not"),
        # a function the registry would refuse: checked before any datastore is made
        (["fn", "create", "a", "f", "--image", "Not An Image"], "function a/f: image 'Not An"),
        ([*NEW, "--memory", "9000"], "function a/f: memory must be between 6 and 8192 MB"),
        ([*NEW, "--timeout", "0"], "function a/f: timeout must be between 1 and 3600"),
        ([*NEW, "--idle-timeout", "4000"], "function a/f: idle timeout must be between"),
        ([*NEW, "--memory", "64", "--tmpfs", "65"], "function a/f: tmpfs must be between 0 and 64"),
        (["fn", "create", "a b", "f", "--image", "i:1"], "function a b/f: app name 'a b' is not"),
        ([*NEW, "--config", "oops"], "Invalid value for '--config': config entry 'oops' must look"),
        (["fn", "update", "a", "f", "--config", "=x"], "Invalid value for '--config': config"),
        # arguments that are not UTF-8 (lone surrogates in Python) once ended in a traceback
        (["calls", "show", "a\udcff"], "'a\\xff' is not UTF-8 text"),
        (["calls", "list", "--app", "\udcff"], "'\\xff' is not UTF-8 text"),
        (["logs", "a\udcff"], "'a\\xff' is not UTF-8 text"),
        (["fn", "show", "a\udcff", "f"], "'a\\xff' is not UTF-8 text"),
        (["fn", "create", "a", "f", "--image", "i", "--config", "K=\udcff"], "'K=\\xff' is not"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_with_status_2(
    settings_env: Path, args: list[str], message: str
) -> None:
    out = CliRunner().invoke(cli, args)
    assert (out.exit_code, out.stdout) == (2, "")
    assert out.stderr.startswith(f"fnq: {message}") and out.stderr.count("\n") == 1, out.stderr
    assert not (settings_env / "data").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "5"], "function a/f: memory must be between 6 and 8192 MB, not 5"),
        (["--tmpfs", "200"], "function a/f: tmpfs must be between 0 and 128 MB"),
        (["--image", "Not An Image"], "function a/f: image 'Not An Image' is not a valid"),
        (["--config", "1BAD=x"], "function a/f: config key '1BAD' is not a valid"),
    ],
)
def test_an_update_the_registry_refuses_is_a_usage_error(
    settings_env: Path, args: list[str], message: str
) -> None:
    assert fnq(*NEW).exit_code == 0
    out = CliRunner().invoke(cli, ["fn", "update", "a", "f", *args])
    assert (out.exit_code, out.stdout) == (2, "")
    assert out.stderr.startswith(f"fnq: {message}") and out.stderr.count("\n") == 1, out.stderr
    assert json.loads(fnq("fn", "show", "a", "f", "--json").output)["memory_mb"] == 128


def test_a_group_without_a_subcommand_shows_its_help(settings_env: Path) -> None:
    out = CliRunner().invoke(cli, ["calls"])
    assert out.exit_code in (0, 2)  # 2 from click 8.2 on
    assert "calls [OPTIONS] COMMAND" in out.output and "retry" in out.output


def test_calls_commands(settings_env: Path) -> None:
    ok = Call(new_call_id(), "shop", "resize")
    bad = Call(new_call_id(), "shop", "crop")
    waiting = Call(new_call_id(), "shop", "resize")
    record([
        (ok, Outcome(CallStatus.SUCCESS, response=Response(200, {"X-A": "1"}, b"resized"),
                     log=b"took 3 ms\n")),
        (bad, Outcome(CallStatus.ERROR, error="The function exited with code 2.", log=b"\xff")),
        (waiting, None),
    ])  # fmt: skip

    listed = json.loads(fnq("calls", "list", "--json").output)
    assert [c["id"] for c in listed["items"]] == [waiting.id, bad.id, ok.id]
    assert listed["next_cursor"] is None
    page = json.loads(fnq("calls", "list", "--limit", "2", "--json").output)
    rest = json.loads(fnq("calls", "list", "--cursor", page["next_cursor"], "--json").output)
    assert [c["id"] for c in page["items"] + rest["items"]] == [waiting.id, bad.id, ok.id]
    only = json.loads(fnq("calls", "list", "--status", "error", "--since", "1h", "--json").output)
    assert [c["id"] for c in only["items"]] == [bad.id]
    table = fnq("calls", "list", "--fn", "resize").output
    assert ok.id in table and waiting.id in table and bad.id not in table

    shown = json.loads(fnq("calls", "show", ok.id, "--json").output)
    for key in ("id", "app", "fn", "status", "error", "attempts", "created_at", "started_at",
                "completed_at"):  # fmt: skip
        assert key in shown
    assert shown["status"] == "success"
    assert shown["response"]["body"] == "resized" and shown["response"]["headers"] == {"X-A": "1"}
    human = fnq("calls", "show", bad.id).output
    assert "The function exited with code 2." in human
    assert "\ncancel_requested  false\n" in human  # as in JSON and `fnq config`, not False

    assert fnq("logs", ok.id).output == "took 3 ms\n"
    assert json.loads(fnq("logs", bad.id, "--json").output)["encoding"] == "base64"
    no_log = CliRunner().invoke(cli, ["logs", waiting.id])
    assert no_log.exit_code == 1 and "has no log yet" in no_log.stderr

    several = CliRunner().invoke(cli, ["calls", "cancel", waiting.id, "NOPE", ok.id])
    assert several.exit_code == 1  # one id is unknown; the others are answered
    assert several.stdout.splitlines() == [
        f"{waiting.id} cancelled",
        f"{ok.id} already ended (success); nothing to cancel",
    ]
    assert several.stderr.startswith("fnq: no call NOPE (")
    assert fnq("calls", "purge", "--older-than", "1h").output.startswith("purged 0 calls")
    assert fnq("calls", "purge", "--older-than", "0s").output.startswith("purged 3 calls")
    assert json.loads(fnq("calls", "list", "--json").output)["items"] == []


def into_closed_pipe(*args: str) -> tuple[int, str]:
    """Run ``fnq ARGS`` with its stdout a pipe whose reader has gone; its status and stderr."""
    proc = subprocess.Popen([FNQ, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes anything: its first write fails
    err = proc.stderr.read()
    return proc.wait(30), err


def test_a_closed_stdout_ends_the_command_quietly(settings_env: Path) -> None:
    call = Call(new_call_id(), "shop", "resize", body=b"x" * 500, headers={"X-A": "1"})
    record([(call, Outcome(CallStatus.SUCCESS, response=Response(200, {}, b"y" * 500)))])
    assert into_closed_pipe("calls", "show", call.id) == (141, "")
    assert into_closed_pipe("calls", "list") == (141, "")
    assert into_closed_pipe("--help") == (141, "")


def test_since_a_time_without_a_zone_is_the_local_time_the_table_shows(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = Call(new_call_id(), "shop", "resize")
    record([(call, None)])

    def listed(since: datetime) -> list[str]:
        out = fnq("calls", "list", "--since", since.isoformat(), "--json").output
        return [c["id"] for c in json.loads(out)["items"]]

    try:
        with monkeypatch.context() as patch:
            patch.setenv("TZ", "EST5")  # five hours behind UTC
            time.tzset()
            [row] = fnq("calls", "list").output.splitlines()[1:]
            created = datetime.fromisoformat(" ".join(row.split()[4:6]))  # CREATED, local
            assert listed(created - timedelta(seconds=1)) == [call.id]
            assert listed(created + timedelta(minutes=1)) == []  # as UTC: five hours before
    finally:
        time.tzset()


def test_the_next_page_hint_keeps_the_filters(settings_env: Path) -> None:
    failed = Outcome(CallStatus.ERROR, error="The function exited with code 1.")
    wanted = [Call(new_call_id(), "shop", "resize") for _ in range(3)]
    others = [Call(new_call_id(), "shop", "crop"), Call(new_call_id(), "blog", "resize")]
    queued = Call(new_call_id(), "shop", "resize")
    record([(c, failed) for c in [*wanted, *others]] + [(queued, None)])

    first = fnq("calls", "list", "--app", "shop", "--fn", "resize", "--status", "error",
                "--since", "1h", "--limit", "2").output.splitlines()  # fmt: skip
    assert first[-1].startswith("more: ")
    hint = shlex.split(first[-1].removeprefix("more: "))
    assert hint[:9] == ["fnq", "calls", "list", "--app", "shop", "--fn", "resize", "--status",
                        "error"]  # fmt: skip
    assert hint[9] == "--since"  # the time "1h" stood for, so that the next page does not move
    assert abs((parse_since(hint[10]) - parse_since("1h")).total_seconds()) < 60
    assert hint[11:14] == ["--limit", "2", "--cursor"] and len(hint) == 15

    second = fnq(*hint[1:]).output.splitlines()
    assert not second[-1].startswith("more: ")
    listed = [line.split()[0] for line in first[1:-1] + second[1:]]
    assert sorted(listed) == sorted(c.id for c in wanted)


def test_a_page_that_read_its_most_says_so(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reading, "LIST_WALK_MAX", 2)
    failed = Outcome(CallStatus.ERROR, error="The function exited with code 1.")
    made = [Call(new_call_id(), "shop", "resize") for _ in range(4)]
    record([(made[0], failed), *((c, None) for c in made[1:])])
    lines = fnq("calls", "list", "--app", "shop", "--status", "error").output.splitlines()
    assert lines[0].split() == ["ID", "FUNCTION", "STATUS", "ATTEMPTS", "CREATED", "RAN", "ERROR"]
    assert lines[1:-1] == ["(0 matched among the 2 calls this page read; older calls may match "
                           "too)"]  # fmt: skip
    hint = shlex.split(lines[-1].removeprefix("more: "))
    second = fnq(*hint[1:]).output.splitlines()  # the two oldest: the error among them
    assert second[1].split()[0] == made[0].id
    assert second[2] == "(1 matched among the 2 calls this page read; older calls may match too)"
    last = fnq(*shlex.split(second[3].removeprefix("more: "))[1:]).output.splitlines()
    assert len(last) == 1  # the headings only: no call older, and no more pages


def test_logs_of_an_ended_call_whose_log_is_gone(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FN_LOG_URL", f"file://{settings_env / 'logs'}")
    ended, waiting = Call(new_call_id(), "a", "f", b""), Call(new_call_id(), "a", "f", b"")
    record([(ended, Outcome(CallStatus.SUCCESS, log=b"hi\n")), (waiting, None)])
    assert fnq("logs", ended.id).output == "hi\n"
    for path in (settings_env / "logs").rglob("*.log"):
        path.unlink()
    out = CliRunner().invoke(cli, ["logs", ended.id])
    assert out.exit_code == 1
    assert (
        out.stderr == f"fnq: call {ended.id} ended (success) but its log is missing "
        "(purged, or the log store lost it)\n"
    )
    out = CliRunner().invoke(cli, ["logs", waiting.id])
    assert "is queued and has no log yet (logs are stored when a call ends)" in out.stderr


def test_logs_of_a_call_that_ended_before_it_ran(settings_env: Path) -> None:
    call = Call(new_call_id(), "a", "f", b"")
    record([(call, None)])
    assert fnq("calls", "cancel", call.id).output == f"{call.id} cancelled\n"
    again = fnq("calls", "cancel", call.id).output
    assert again == f"{call.id} was already cancelled; nothing to do\n"
    out = CliRunner().invoke(cli, ["logs", call.id])
    assert out.exit_code == 1
    assert out.stderr == f"fnq: call {call.id} ended (cancelled) before it ran, so it has no log\n"


def test_fn_create_help_shows_the_defaults_a_new_function_gets(settings_env: Path) -> None:
    helped = " ".join(fnq("fn", "create", "--help").output.split())
    for flag, default in [("--memory", 128), ("--timeout", 30), ("--max-attempts", 3),
                          ("--retry-backoff", 2.0), ("--max-age", 21600)]:  # fmt: skip
        assert f"{flag} " in helped and f"[default: {default}]" in helped
    assert "[default:" not in fnq("fn", "update", "--help").output  # what is not given stays
    shown = json.loads(fnq("fn", "create", "a", "f", "--image", "i:1", "--json").output)
    assert (shown["memory_mb"], shown["timeout_s"], shown["max_attempts"]) == (128, 30, 3)
