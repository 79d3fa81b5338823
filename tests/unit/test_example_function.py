"""The example function's handler (scripts/functions/example), run here in Python with
a stand-in for the FDK's ``fdk.response``: it greets with its config GREETING."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

FUNC_PY = Path(__file__).resolve().parents[2] / "scripts/functions/example/func.py"


class Response:
    def __init__(self, ctx: object, response_data: str = "", headers: Any = None) -> None:
        self.body, self.headers = response_data, headers


class Context:
    def CallID(self) -> str:  # the FDK's name
        return "01CALL"


@pytest.fixture
def handler(monkeypatch: pytest.MonkeyPatch) -> Any:
    fdk = types.ModuleType("fdk")
    fdk.response = types.SimpleNamespace(Response=Response)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fdk", fdk)
    spec = importlib.util.spec_from_file_location("example_func", FUNC_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.handler


def greet(handler: Any, body: bytes) -> str:
    answer = handler(Context(), io.BytesIO(body))
    assert answer.headers == {"Content-Type": "application/json"}
    return str(json.loads(answer.body)["message"])


@pytest.mark.parametrize(("greeting", "message"), [(None, "Hello"), ("", "Hello"), ("hi", "hi")])
def test_the_greeting_is_the_config_greeting(
    handler: Any, monkeypatch: pytest.MonkeyPatch, greeting: str | None, message: str
) -> None:
    if greeting is None:
        monkeypatch.delenv("GREETING", raising=False)
    else:
        monkeypatch.setenv("GREETING", greeting)
    assert greet(handler, b'{"name": "Ada"}') == f"{message}, Ada!"
    assert greet(handler, b"") == f"{message}, world!"
    assert greet(handler, b"Grace") == f"{message}, Grace!"
