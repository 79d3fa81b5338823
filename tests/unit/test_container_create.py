"""The environment of a function's container: its config and the FDK variables."""

from __future__ import annotations

import dataclasses

import pytest

from config.domain import Function
from config.settings import Settings
from datastore.errors import InvalidFunction
from datastore.validate import validate_function
from worker.agent.drivers.docker_config import create_body, host_config
from worker.agent.hot_life import container_spec


def test_config_cannot_rename_the_app_or_the_function() -> None:
    config = {"FN_APP_NAME": "other", "FN_FN_NAME": "other", "MODE": "fast"}
    fn = Function(app="shop", name="resize", image="team/resize:1", config=config)
    body = create_body(
        Settings(), container_spec(fn, "c1"), instance="i", iofs_docker_path="/x", network=None
    )
    env = dict(entry.split("=", 1) for entry in body["Env"])
    # Config FN_APP_NAME/FN_FN_NAME used to replace the names the FDK reports.
    assert (env["FN_APP_NAME"], env["FN_FN_NAME"], env["MODE"]) == ("shop", "resize", "fast")


@pytest.mark.parametrize("mcpu", [1, 5, 9])
def test_a_cpu_quota_under_the_engines_1ms_is_refused_at_registration(mcpu: int) -> None:
    # The engine refuses CpuQuota < 1000 us: every launch of the function failed.
    fn = Function(app="shop", name="resize", image="team/resize:1", cpus_mcpu=mcpu)
    with pytest.raises(InvalidFunction, match=r"cpus must be 0 .* or between 10 and 256000"):
        validate_function(fn)
    for ok in (0, 10, 256_000):
        assert validate_function(dataclasses.replace(fn, cpus_mcpu=ok)).cpus_mcpu == ok


def test_the_inode_limit_holds_for_a_tmp_of_dockers_default_size() -> None:
    # FN_MAX_TMPFS_INODES was dropped when the function set no tmpfs_mb.
    spec = container_spec(Function(app="a", name="f", image="i:1"), "c1")
    host = host_config(Settings(max_tmpfs_inodes=500), spec, "/x", None)
    assert host["Tmpfs"] == {"/tmp": "nr_inodes=500"}
