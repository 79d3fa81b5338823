"""Fixtures of the docker driver tests: the function images and a running driver."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from worker.agent.driver import ContainerSpec, DispatchRequest
from worker.agent.drivers.docker import DockerDriver
from worker.agent.drivers.docker_container import DockerContainer, OutputTiming
from worker.images import ImageBuilder, find_functions

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_DIRS = [ROOT / "tests" / "functions", ROOT / "scripts" / "functions"]


@pytest.fixture(scope="session")
def function_images(docker_engine: Any) -> list[str]:
    """Build (or find cached) every test function image once per session."""
    with ImageBuilder(client=docker_engine) as builder:
        results = builder.build(find_functions(FUNCTION_DIRS))
    return [r.image for r in results]


@pytest.fixture
def label_tag() -> str:
    """A classifier of this test's own, so parallel workers on this engine are left alone."""
    return f"fnq-test-{secrets.token_hex(4)}"


@pytest.fixture
def make_settings(settings_env: Path, label_tag: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "container_label_tag": label_tag,
            "hot_start_timeout_msecs": 10_000,
            "cpu_split": "off",  # the test process is no worker: its threads stay put
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def driver(
    function_images: list[str], make_settings: Callable[..., Settings]
) -> AsyncIterator[DockerDriver]:
    d = DockerDriver(make_settings())
    await d.start()
    yield d
    await d.close()


@pytest.fixture(params=["pipes", "markers"])
async def any_output_driver(
    request: pytest.FixtureRequest,
    function_images: list[str],
    make_settings: Callable[..., Settings],
) -> AsyncIterator[DockerDriver]:
    """A driver reading output from pipes of its own, or marking it in the engine's stream."""
    timing = OutputTiming(use_pipes=request.param == "pipes")
    d = DockerDriver(make_settings(), output_timing=timing)
    await d.start()
    yield d
    await d.close()


@pytest.fixture
def docker_api(docker_engine: Any) -> Iterator[Any]:
    yield docker_engine.api


def spec(image: str, **kw: Any) -> ContainerSpec:
    name = image.rsplit("/", maxsplit=1)[-1].split(":", maxsplit=1)[0]
    values: dict[str, Any] = {"app": "tests", "fn": name, "memory_mb": 128}
    values.update(kw)
    return ContainerSpec(id=f"fnq-t-{name}-{secrets.token_hex(4)}", image=image, **values)


def request(body: bytes = b"", timeout_s: float = 30.0, **headers: str) -> DispatchRequest:
    return DispatchRequest(
        call_id=f"call-{secrets.token_hex(4)}",
        body=body,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        deadline=datetime.now(UTC) + timedelta(seconds=timeout_s),
        timeout_s=timeout_s,
    )


@asynccontextmanager
async def running(driver: DockerDriver, s: ContainerSpec) -> AsyncIterator[DockerContainer]:
    container = await driver.create(s)
    try:
        await container.start()
        yield container
    finally:
        await container.remove()
