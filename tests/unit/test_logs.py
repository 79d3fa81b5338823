"""Worker log lines carry the id of the call being handled."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import pkgutil
import sys
from pathlib import Path

import pytest

from config.settings import load_settings
from worker.agent.drivers.docker import DockerDriver
from worker.agent.tasks import TaskSet
from worker.logs import JsonFormatter, current_call, setup_logging


async def test_call_id_follows_the_call_but_not_long_lived_tasks(
    settings_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(load_settings(log_format="json"))
    log = logging.getLogger("fnq.test")
    tasks = TaskSet("test")

    async def long_lived() -> None:
        log.info("launcher line")

    async def call_task() -> None:
        current_call.set("01CALL")
        log.info("call line")
        await asyncio.create_task(asyncio.sleep(0))  # a child task keeps the id
        tasks.spawn(long_lived(), "launcher")  # started by the call, outlives it

    await asyncio.create_task(call_task())
    await tasks.close(1.0)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    by_msg = {line["msg"]: line for line in lines}
    assert by_msg["call line"]["call_id"] == "01CALL"
    assert by_msg["call line"]["level"] == "info" and by_msg["call line"]["logger"] == "fnq.test"
    assert "call_id" not in by_msg["launcher line"]
    logging.getLogger().handlers.clear()


def test_json_lines_hold_exceptions() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "oops", None, None)
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "oops" and "ValueError: bad" in doc["exc"]


@pytest.mark.parametrize(
    ("package", "known"),
    [
        ("worker", ("worker.agent.drivers.docker", "fnq.agent.docker")),
        ("datastore", ("datastore.postgres", "fnq.datastore.postgres")),
        ("mq", None),
        ("config", None),
    ],
)
def test_every_logger_is_named_fnq(package: str, known: tuple[str, str] | None) -> None:
    """Log pipelines pick fnq's lines by logger name (``fnq.*``), the docker
    driver's (``pulling image ...``) and the datastore's among them."""
    root = importlib.import_module(package)
    found = []
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        module = importlib.import_module(info.name)
        found += [
            (info.name, v.name) for v in vars(module).values() if isinstance(v, logging.Logger)
        ]
    if known is not None:
        assert known in found
    assert [(module, name) for module, name in found if not name.startswith("fnq.")] == []


async def test_the_pull_line_is_the_docker_drivers(
    settings_env: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = DockerDriver(load_settings())

    async def pulled(*args: object, **kwargs: object) -> None:
        return None

    monkeypatch.setattr(driver.api, "stream_json", pulled)
    with caplog.at_level(logging.INFO, logger="fnq.agent.docker"):
        await driver._pull("fnq/none:1")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("fnq.agent.docker", "pulling image fnq/none:1")
    ]
