"""The body of ``POST /containers/create`` for one hot container: pure data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from config.domain import hostname_id, pid_namespace
from config.settings import Settings
from worker.agent.driver import FN_LISTENER, IOFS_MOUNT, ContainerSpec

MIB = 1024 * 1024
CPU_PERIOD_US = 100_000  # CFS period; quota = milli-CPUs x 100 us, so 1000m = one CPU
UNPRIVILEGED_USER = "1000:1000"

CLASSIFIER_LABEL = "fnq.classifier"
INSTANCE_LABEL = "fnq.instance"
OWNER_LABEL = "fnq.owner"  # <host name>:<pid> of the worker, to tell dead workers from live ones
PIDNS_LABEL = "fnq.pidns"  # the pid namespace that pid is of (config.domain.pid_namespace)
APP_LABEL = "fnq.app"
FN_LABEL = "fnq.fn"


def container_env(spec: ContainerSpec) -> dict[str, str]:
    """The spec's environment plus the FDK contract (FN_LISTENER and FN_FORMAT always win;
    hot containers set the rest from the function, over its config)."""
    env = dict(spec.env)
    env.setdefault("FN_APP_NAME", spec.app)
    env.setdefault("FN_FN_NAME", spec.fn)
    env.setdefault("FN_MEMORY", str(spec.memory_mb))
    env["FN_FORMAT"] = "http-stream"
    env["FN_LISTENER"] = FN_LISTENER
    return env


def container_labels(settings: Settings, instance: str, spec: ContainerSpec) -> dict[str, str]:
    labels = {APP_LABEL: spec.app, FN_LABEL: spec.fn}
    if settings.container_label_tag:
        labels[CLASSIFIER_LABEL] = settings.container_label_tag
        labels[INSTANCE_LABEL] = instance
        labels[OWNER_LABEL] = hostname_id()
        labels[PIDNS_LABEL] = pid_namespace()
    return labels


def _ulimits(settings: Settings) -> list[dict[str, Any]]:
    wanted = {
        "nofile": settings.max_open_files,
        "memlock": settings.max_locked_memory,
        "sigpending": settings.max_pending_signals,
        "msgqueue": settings.max_message_queue,
    }
    return [{"Name": n, "Soft": v, "Hard": v} for n, v in wanted.items() if v > 0]


def _tmpfs(settings: Settings, spec: ContainerSpec) -> dict[str, str]:
    if spec.tmpfs_mb == 0 and settings.disable_readonly_rootfs:
        return {}
    # A read-only root still needs a writable /tmp: docker's default size then.
    opts = [f"size={spec.tmpfs_mb}m"] if spec.tmpfs_mb > 0 else []
    if settings.max_tmpfs_inodes > 0:
        opts.append(f"nr_inodes={settings.max_tmpfs_inodes}")
    return {"/tmp": ",".join(opts)}


def host_config(
    settings: Settings,
    spec: ContainerSpec,
    iofs_docker_path: str,
    network: str | None,
    cpuset: str | None = None,
) -> dict[str, Any]:
    host: dict[str, Any] = {
        "Init": True,
        "ReadonlyRootfs": not settings.disable_readonly_rootfs,
        "Binds": [f"{iofs_docker_path}:{IOFS_MOUNT}:rw"],
        "NetworkMode": network or "none",
        "LogConfig": {"Type": "none", "Config": {}},  # output is read through attach
        "Ulimits": _ulimits(settings),
        "Tmpfs": _tmpfs(settings, spec),
    }
    if spec.memory_mb > 0:
        host["Memory"] = spec.memory_mb * MIB
        host["MemorySwap"] = spec.memory_mb * MIB  # the same: no swap
    if spec.cpus_mcpu > 0:
        host["CpuQuota"] = spec.cpus_mcpu * 100
        host["CpuPeriod"] = CPU_PERIOD_US
    if cpuset:
        host["CpusetCpus"] = cpuset
    if settings.max_pids > 0:
        host["PidsLimit"] = settings.max_pids
    if settings.max_fs_size_mb > 0:
        host["StorageOpt"] = {"size": f"{settings.max_fs_size_mb}M"}
    if not settings.disable_unprivileged_containers:
        host["CapDrop"] = ["ALL"]
        host["SecurityOpt"] = ["no-new-privileges"]
    return host


def create_body(
    settings: Settings,
    spec: ContainerSpec,
    *,
    instance: str,
    iofs_docker_path: str,
    network: str | None,
    entrypoint: list[str] | None = None,
    cpuset: str | None = None,
) -> dict[str, Any]:
    """``entrypoint`` replaces the image's entrypoint and command (drivers.pipes);
    ``cpuset``: the CPUs it may run on ("0-2,5"; None: any)."""
    body: dict[str, Any] = {
        "Image": spec.image,
        "Env": [f"{k}={v}" for k, v in container_env(spec).items()],
        "Labels": container_labels(settings, instance, spec),
        "AttachStdin": False,
        "AttachStdout": True,
        "AttachStderr": True,
        "OpenStdin": False,
        "Tty": False,
        "HostConfig": host_config(settings, spec, iofs_docker_path, network, cpuset),
    }
    if entrypoint is not None:
        body["Entrypoint"] = entrypoint  # the image's Cmd is then not added
    if not settings.disable_unprivileged_containers:
        body["User"] = UNPRIVILEGED_USER
    return body


def image_volumes(inspect: Mapping[str, Any]) -> list[str]:
    config = inspect.get("Config") or {}
    return sorted((config.get("Volumes") or {}).keys())


def image_command(inspect: Mapping[str, Any]) -> list[str]:
    """What a container of the image runs: its entrypoint, then its command."""
    config = inspect.get("Config") or {}
    return [str(x) for x in (config.get("Entrypoint") or []) + (config.get("Cmd") or [])]
