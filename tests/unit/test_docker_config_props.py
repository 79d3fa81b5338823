"""Properties of the container create request: for any function the registry takes and
any settings, the environment, limits and labels are those that docs/functions.md and
docs/configuration.md state (rules written again below, not taken from the code)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, reject, settings
from hypothesis import strategies as st

from config.domain import Function
from config.settings import Settings
from datastore.errors import InvalidFunction
from datastore.validate import validate_function
from worker.agent.drivers.docker_config import create_body
from worker.agent.hot_life import container_spec

MIB = 1024 * 1024
FDK_KEYS = ("FN_APP_NAME", "FN_FN_NAME", "FN_MEMORY", "FN_FORMAT", "FN_LISTENER")
# Also set by fnq for the FDK, as Fn does: the ids and the call type.
EXTRA_KEYS = ("FN_APP_ID", "FN_FN_ID", "FN_TYPE")

good_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
env_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True) | st.sampled_from(
    FDK_KEYS + EXTRA_KEYS + ("PATH", "HOME")
)
env_values = st.text(st.characters(exclude_characters="\0", codec="utf-8"), max_size=20)


@st.composite
def functions(draw: st.DrawFn) -> Function:
    memory = draw(st.integers(1, 8192))
    fn = Function(
        app=draw(good_names),
        name=draw(good_names),
        image=draw(st.sampled_from(["team/resize:1", "fnq/echo:latest", "r.example:5000/a/b"])),
        memory_mb=memory,
        cpus_mcpu=draw(st.integers(0, 256_000) | st.integers(0, 20)),
        tmpfs_mb=draw(st.just(0) | st.integers(0, memory)),
        config=draw(st.dictionaries(env_keys, env_values, max_size=6)),
    )
    try:
        return validate_function(fn)  # one the registry takes
    except InvalidFunction:
        reject()


limits = st.just(0) | st.integers(1, 10**7)
settings_values = st.fixed_dictionaries(
    {
        "container_label_tag": st.sampled_from(["", "fnq", "other-tag"]),
        "max_pids": limits,
        "max_fs_size_mb": limits,
        "max_open_files": limits,
        "max_locked_memory": limits,
        "max_pending_signals": limits,
        "max_message_queue": limits,
        "max_tmpfs_inodes": limits,
        "disable_readonly_rootfs": st.booleans(),
        "disable_unprivileged_containers": st.booleans(),
    }
)


@settings(max_examples=300)
@given(
    functions(),
    settings_values,
    st.none() | st.sampled_from(["fnq-net", "bridge"]),
    st.none() | st.sampled_from(["0", "1-3,5"]),
)
def test_the_create_request_is_what_the_docs_say(
    fn: Function, values: dict[str, Any], network: str | None, cpuset: str | None
) -> None:
    conf = Settings(**values)
    body = create_body(
        conf,
        container_spec(fn, "fnq-c1"),
        instance="inst-1",
        iofs_docker_path="/srv/iofs/x",
        network=network,
        cpuset=cpuset,
    )
    assert body["Image"] == fn.image

    # The function's config plus the FDK variables; config cannot change those.
    pairs = [entry.split("=", 1) for entry in body["Env"]]
    env = dict(pairs)
    assert len(env) == len(pairs)  # no key twice
    fdk = {
        "FN_APP_NAME": fn.app,
        "FN_FN_NAME": fn.name,
        "FN_MEMORY": str(fn.memory_mb),
        "FN_FORMAT": "http-stream",
        "FN_LISTENER": "unix:/tmp/iofs/lsnr.sock",
        "FN_APP_ID": fn.app,
        "FN_FN_ID": fn.name,
        "FN_TYPE": "async",
    }
    assert env == {**fn.config, **fdk}

    labels = {"fnq.app": fn.app, "fnq.fn": fn.name}
    if values["container_label_tag"]:
        labels |= {
            "fnq.classifier": values["container_label_tag"],
            "fnq.instance": "inst-1",
            "fnq.owner": f"{os.uname().nodename}:{os.getpid()}",
            "fnq.pidns": str(os.stat("/proc/self/ns/pid").st_ino),
        }
    assert body["Labels"] == labels

    host = body["HostConfig"]
    # Memory: memory_mb, and no swap on top.
    assert host["Memory"] == host["MemorySwap"] == fn.memory_mb * MIB
    # CPU: mCPU x 100 us of each 100 ms, never under the engine's 1 ms; none for 0.
    if fn.cpus_mcpu:
        assert (host["CpuQuota"], host["CpuPeriod"]) == (fn.cpus_mcpu * 100, 100_000)
        assert host["CpuQuota"] >= 1000
    else:
        assert "CpuQuota" not in host and "CpuPeriod" not in host
    assert host.get("CpusetCpus") == cpuset
    assert host.get("PidsLimit") == (values["max_pids"] or None)
    fs = values["max_fs_size_mb"]
    assert host.get("StorageOpt") == ({"size": f"{fs}M"} if fs else None)
    ulimits = {
        "nofile": values["max_open_files"],
        "memlock": values["max_locked_memory"],
        "sigpending": values["max_pending_signals"],
        "msgqueue": values["max_message_queue"],
    }
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]} == {
        name: (v, v) for name, v in ulimits.items() if v
    }
    assert len(host["Ulimits"]) == len({u["Name"] for u in host["Ulimits"]})

    # Root file system read-only with a tmpfs /tmp (tmpfs_mb, or docker's default size).
    readonly = not values["disable_readonly_rootfs"]
    assert host["ReadonlyRootfs"] is readonly
    opts = [f"size={fn.tmpfs_mb}m"] if fn.tmpfs_mb else []
    opts += [f"nr_inodes={values['max_tmpfs_inodes']}"] if values["max_tmpfs_inodes"] else []
    if readonly or fn.tmpfs_mb:
        assert host["Tmpfs"] == {"/tmp": ",".join(opts)}
    else:
        assert host["Tmpfs"] == {}

    assert host["NetworkMode"] == (network or "none")
    assert host["Binds"] == ["/srv/iofs/x:/tmp/iofs:rw"]
    assert host["Init"] is True
    if values["disable_unprivileged_containers"]:
        assert "User" not in body and "CapDrop" not in host and "SecurityOpt" not in host
    else:
        assert body["User"] == "1000:1000"
        assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
