"""Typed settings, read once from the environment (prefix ``FN_``) and ``.env``.

Build a :class:`Settings` at the entry point and pass it down; nothing in fnq
reads the environment anywhere else. Names, meanings and defaults follow the
Fn agent; where fnq departs from Fn's default the field says why, and
``docs/configuration.md`` (made by ``fnq config --markdown``) repeats it.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, unquote_plus, urlsplit

from dotenv import dotenv_values
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.errors import ConfigError

ENV_PREFIX = "FN_"
_URL_EXAMPLES = {
    "mq_url": "sqlite:///path or redis://host:6379/0",
    "db_url": "sqlite:///path or postgresql://user@host/db",
    "log_url": "file:///var/lib/fnq/logs (or empty)",
    "rq_url": "redis://host:6379/0 or unix:///SOCKET?db=DB (or empty)",
}
_MAX_MSECS = 10 * 365 * 24 * 3600 * 1000  # what "disabled" (a negative value) turns into
# An integer setting as text: int() and pydantic also read '1_0' (as 10), '10.0'
# and other scripts' digits, which in a setting are typos.
_BLANK = " \t\r\n"
_INTEGER = re.compile(r"[+-]?[0-9]+")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fnq"


def sqlite_url(path: Path) -> str:
    """``sqlite:///`` and ``path`` made absolute, with a URL's own characters escaped;
    a name's bytes that are not UTF-8 (kept by Python as surrogates) as their ``%XX``."""
    return f"sqlite://{quote(str(path.absolute()), safe='/', errors='surrogateescape')}"


def sqlite_path(url: str, what: str) -> Path:
    """The file a ``sqlite:///ABSOLUTE/PATH`` URL names (``sqlite:////`` too); ``%XX``
    bytes that are not UTF-8 stay those bytes. ValueError, naming ``what`` (the
    setting), for anything else."""
    shown = f"{what} {mask_url(url)!r}"
    malformed = f"{shown}: a SQLite URL looks like sqlite:///absolute/path.db"
    try:
        parts = urlsplit(url)
    except ValueError:  # a '[' that opens no IPv6 address
        raise ValueError(malformed) from None
    path = unquote(parts.path, errors="surrogateescape")
    if parts.netloc or not path.strip("/") or "\x00" in path:
        raise ValueError(malformed)
    if parts.query or parts.fragment:
        raise ValueError(
            f"{shown}: a SQLite URL takes no options (write a '?' or '#' in the path as %3F or %23)"
        )
    return Path("/" + path.lstrip("/"))


def _msecs(description: str, default: int, **kw: Any) -> Any:
    kw.setdefault("le", _MAX_MSECS)  # longer is never in practice: a negative value says so
    return Field(default, description=description, **kw)


class Settings(BaseSettings):
    """Every knob of fnq. Attribute ``x_y`` is environment variable ``FN_X_Y``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        frozen=True,
    )

    # ------------------------------------------------------------- storage
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory of the embedded SQLite queue and datastore. "
        "fnq: $XDG_DATA_HOME/fnq (Fn used <cwd>/data), so that the CLI and the worker "
        "find the same files from any directory.",
    )
    mq_url: str = Field(
        "",
        description="Message queue: sqlite:///PATH, redis://HOST:PORT/DB, rediss://... (TLS) "
        "or unix:///SOCKET?db=DB (a Redis on this host); "
        "empty means sqlite:///<data dir>/mq.db.",
    )
    db_url: str = Field(
        "",
        description="Datastore: sqlite:///PATH or postgresql://USER@HOST:PORT/DB; "
        "empty means sqlite:///<data dir>/fnq.db.",
    )
    log_url: str = Field(
        "",
        description="Log store: empty for the datastore itself, or file:///DIR for one file "
        "per call.",
    )

    # ----------------------------------------------------------- operations
    sentry_dsn: SecretStr | None = Field(
        None, description="Report the worker's own errors to Sentry (never function errors)."
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port; 0 turns it off "
        "(several workers on one host would otherwise collide).",
    )
    log_level: str = Field("INFO", description="Worker log level (DEBUG, INFO, WARNING, ERROR).")
    log_format: Literal["text", "json"] = Field(
        "text", description="Worker log lines: text, or json (one object a line, with call_id)."
    )
    shutdown_grace_msecs: int = _msecs(
        "On SIGTERM/SIGINT, how long running calls may finish before they are stopped.",
        30_000,
        ge=0,
    )

    # ---------------------------------------------------------------- queue
    async_chew_poll_msecs: int = _msecs(
        "Longest single wait for a message when the queue is empty.", 60_000, ge=1
    )
    mq_reservation_msecs: int = _msecs(
        "How long a reserved message stays invisible without a heartbeat. fnq extends it "
        "while the call runs (Fn used a fixed 60 s and ran long calls twice).",
        60_000,
        ge=1_000,
    )
    mq_max_deliveries: int = Field(
        10,
        ge=1,
        description="Deliveries after which a message that keeps coming back (e.g. its worker "
        "dies each time) moves to the dead letters.",
    )
    running_mark_msecs: int = _msecs(
        "How long a call runs before its record says `running`; 0 = as it starts. A call "
        "that ends sooner goes from queued to its final state in one write.",
        50,
        ge=0,
    )
    rq_queues: str = Field(
        "",
        description="Comma-separated RQ queue names that `fnq worker` also takes calls from "
        "(on the Redis of FN_RQ_URL, default FN_MQ_URL's server).",
    )
    rq_url: str = Field(
        "",
        description="Redis of the RQ queues in FN_RQ_QUEUES (redis://HOST:PORT/DB or "
        "unix:///SOCKET?db=DB); empty means "
        "the server of FN_MQ_URL when that is a Redis URL.",
    )
    max_request_size: int = Field(
        1_048_576,
        ge=1,
        description="Largest call body accepted on the queue, in bytes. fnq: 1 MiB "
        "(Fn had no limit; every byte is stored in the queue and the datastore).",
    )

    # ------------------------------------------------------------ resources
    max_total_cpu_mcpus: int = Field(
        0, ge=0, description="Clamp on the CPU this worker hands out, in milli-CPUs; 0 = none."
    )
    max_total_memory_bytes: int = Field(
        0, ge=0, description="Clamp on the memory this worker hands out, in bytes; 0 = none."
    )
    enable_nb_resource_tracker: bool = Field(
        False,
        description="Fail a launch at once (server busy) instead of waiting for memory/CPU.",
    )
    async_count_idle: bool = Field(
        False,
        description="Count idle and paused containers against the 80 % mark that gates the "
        "intake, as Fn does: a worker whose memory is full of idle containers then takes no "
        "call until one times out. Off: they are room the worker takes back (a call reuses "
        "one, or a launch evicts one), and only busy and starting containers hold the intake.",
    )

    # ---------------------------------------------------------- hot slots
    freeze_idle_msecs: int = _msecs(
        "Idle time before a hot container is paused, counted from its function's last "
        "call as well; 0 = at once, negative = never. fnq: 1000 (Fn: 50), see "
        "docs/configuration.md.",
        1_000,
    )
    hot_poll_msecs: int = _msecs(
        "How often a waiting call nudges its launcher; also the blocking wait for "
        "resources before evicting.",
        200,
        ge=1,
    )
    hot_launcher_timeout_msecs: int = _msecs(
        "Idle lifetime of a function's launcher (at least 2 x its idle timeout); "
        "negative = no limit.",
        3_600_000,
    )
    hot_pull_timeout_msecs: int = _msecs("Longest image pull; negative = no limit.", 600_000)
    hot_start_timeout_msecs: int = _msecs("Container start until its socket is ready.", 5_000, ge=1)
    hot_start_concurrency: int = Field(
        4,
        ge=0,
        description="Containers a worker creates and starts at the same time, at most; "
        "0 = no limit (Fn). A launch waits for its turn, and is dropped if by then "
        "every waiting call has a container.",
    )
    hot_grow_spare_mcpus: int = Field(
        500,
        ge=0,
        description="A function whose calls are short (under 20 ms) and whose busy "
        "containers keep coming free gets another, once the worker has two containers "
        "per CPU, only while those are busy at least 75 % of the time, the host has this "
        "much CPU idle (mCPU, from /proc/stat) and the worker itself uses less than 90 % "
        "of one. 0 = no such checks (grow on waiting calls alone, as Fn).",
    )
    hot_displace_wait_percent: int = Field(
        50,
        ge=0,
        le=100,
        description="A function with no container whose launch has waited this share of "
        "its timeout (percent) for memory and CPU that busy containers of other functions "
        "hold takes room from them: a busy one leaves once its current call is over (of "
        "the function with the most containers first, the longest-held first, having "
        "served at least two calls). 0 = never (as Fn: it waits until room comes free).",
    )
    cpu_split: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Give the worker's process a CPU of its own and run its containers "
        "on the host's other CPUs (workers on one host each claim a different CPU). "
        "auto: while the worker uses at least half a CPU itself and has at most three "
        "containers per CPU; it shares again with more containers, or when it goes quiet "
        "while its containers' CPUs are full; at most one change per 10 s. on: always; "
        "off: never. A host with one CPU never splits.",
    )

    # ---------------------------------------------------------- responses
    max_response_size: int = Field(
        1_048_576,
        ge=0,
        description="Largest response body, in bytes; 0 = unlimited. A 200 answer over it "
        "ends the call `error` (not retried), its body stored cut there. fnq: 1 MiB "
        "(Fn: unlimited), since responses are stored in the datastore.",
    )
    max_hdr_response_size: int = Field(
        0, ge=0, description="Largest response header block, in bytes; 0 = 10 MiB."
    )
    max_log_size_bytes: int = Field(
        1_048_576, ge=0, description="Stored log per call, in bytes, then one truncation marker."
    )
    disable_debug_user_logs: bool = Field(
        False, description="Do not copy function output into the worker's DEBUG log."
    )

    # ----------------------------------------------------------- containers
    max_fs_size_mb: int = Field(0, ge=0, description="Container root filesystem size; 0 = none.")
    max_pids: int = Field(50, ge=0, description="Process limit per container; 0 = none.")
    max_open_files: int = Field(350, ge=0, description="nofile ulimit; 0 = docker's default.")
    max_locked_memory: int = Field(65_536, ge=0, description="memlock ulimit; 0 = default.")
    max_pending_signals: int = Field(5_000, ge=0, description="sigpending ulimit; 0 = default.")
    max_message_queue: int = Field(819_200, ge=0, description="msgqueue ulimit; 0 = default.")
    max_tmpfs_inodes: int = Field(0, ge=0, description="nr_inodes of /tmp; 0 = default.")
    disable_readonly_rootfs: bool = Field(False, description="Let functions write to /.")
    disable_unprivileged_containers: bool = Field(
        False, description="Run as the image's user with default capabilities."
    )
    docker_networks: str = Field(
        "",
        description="Whitespace-separated networks; each container joins the least used. "
        "Empty = no network at all (fnq: Fn used docker's default network).",
    )
    docker_load_file: str = Field("", description="Image tarball loaded when the worker starts.")
    container_label_tag: str = Field(
        "fnq",
        description="Label value marking fnq's containers; leftovers of dead workers are "
        "removed at start. fnq: on by default (Fn: off).",
    )
    image_enable_volume: bool = Field(False, description="Allow images that declare VOLUME.")
    image_clean_max_size: int = Field(
        0,
        ge=0,
        description="Image cache high-water mark in bytes; 0 = no cleaner. While the engine's "
        "images take this much or more, idle ones are removed, least recently used first "
        "(offline, a removed image cannot be pulled back).",
    )
    image_clean_exempt_tags: str = Field(
        "", description="Whitespace-separated images the cleaner never removes (see above)."
    )

    # ---------------------------------------------------------------- iofs
    iofs_path: str = Field(
        "", description="Host directory for per-container socket directories; empty = temp dir."
    )
    iofs_docker_path: str = Field(
        "", description="The same directory as the docker daemon sees it (docker-in-docker)."
    )
    iofs_tmpfs: bool = Field(False, description="Mount a tmpfs on each socket directory.")
    iofs_opts: str = Field("", description="Mount options of that tmpfs.")

    # ---------------------------------------------------------- validation
    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper() if value.isascii() else value  # a dotless i upper-cases to I
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _format(cls, value: object) -> object:
        """Any case, as FN_LOG_LEVEL; a value that is neither is reported as given."""
        if isinstance(value, str) and value.lower() in {"text", "json"}:
            return value.lower()
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _integer(cls, value: object, info: ValidationInfo) -> object:
        """An integer written as text is ASCII digits with an optional sign; blanks
        (spaces, tabs, line ends) around them are ignored."""
        if (
            not isinstance(value, str)
            or cls.model_fields[str(info.field_name)].annotation is not int
        ):
            return value
        digits = value.strip(_BLANK)
        if not _INTEGER.fullmatch(digits):
            raise ValueError("must be an integer: ASCII digits with an optional sign")
        return digits

    @field_validator("mq_url", "db_url", "log_url", "rq_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        example = _URL_EXAMPLES.get(str(info.field_name), "sqlite:///path")
        if "://" not in value:
            raise ValueError(f"must be a URL such as {example}")
        try:
            urlsplit(value)  # a host in brackets that is no IPv6 address, a lone '['
        except ValueError as exc:
            raise ValueError(f"{exc}: not a URL such as {example}") from None
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if not self.mq_url:
            object.__setattr__(self, "mq_url", sqlite_url(self.data_dir / "mq.db"))
        if not self.db_url:
            object.__setattr__(self, "db_url", sqlite_url(self.data_dir / "fnq.db"))
        return self

    # ---------------------------------------------------------- durations
    def secs(self, field_name: str) -> float:
        """A ``*_msecs`` setting in seconds; a negative value means disabled (very long)."""
        value = int(getattr(self, field_name))
        return (_MAX_MSECS if value < 0 else value) / 1000.0

    @property
    def freeze_idle_s(self) -> float | None:
        """Seconds before pausing an idle container; ``None`` means never."""
        return None if self.freeze_idle_msecs < 0 else self.freeze_idle_msecs / 1000.0

    @property
    def networks(self) -> list[str]:
        return self.docker_networks.split()


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def unknown_env_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``FN_*`` variables that name no setting (a typo is otherwise silently ignored),
    each as ``NAME`` or ``NAME (did you mean FN_X?)``, sorted. By default those of
    the environment and of ``.env`` in the current directory, as Settings reads them."""
    names = set(os.environ if environ is None else environ)
    if environ is None and Path(".env").is_file():
        names.update(dotenv_values(".env"))
    known = {env_name(field) for field in Settings.model_fields}
    out = []
    for name in sorted(n for n in names if n.upper().startswith(ENV_PREFIX)):
        if name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one readable ConfigError."""
    try:
        return Settings(**overrides)
    except UnicodeDecodeError as exc:  # reading .env
        raise ConfigError(f".env: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = str(err["loc"][0]) if err["loc"] else "?"
            name = env_name(loc) if loc in Settings.model_fields else loc
            value = err.get("input")
            if loc in URL_FIELDS and isinstance(value, str):
                value = mask_url(value)
            elif loc in SECRET_FIELDS:
                value = "***"
            hint = " (empty is a value: to get the default, unset it)" if value == "" else ""
            problems.append(f"{name}={value!r}: {err['msg']}{hint}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


SECRET_FIELDS = frozenset({"sentry_dsn"})
URL_FIELDS = frozenset({"mq_url", "db_url", "log_url", "rq_url"})


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_KEY = re.compile(r"[?&]([^?&=]*)=")


def mask_url(url: str) -> str:
    """``url`` with its passwords hidden, however it is written: ``scheme://user:***@host``
    (the userinfo taken to end at the last '@', a password may hold a raw '/', '?', '#'
    or '@'), and everything after a query option named like a password (``password=``,
    ``sslpassword=``, ``ssl_password=``, in any case or %-escaped), as a raw '&' or
    '#' may be part of its value. Where the URL is ambiguous, more is hidden."""
    spans = []
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    at = url.rfind("@")
    colon = url.find(":", start, at) if at > start else -1
    if colon >= 0:
        spans.append((colon + 1, at))
    for key in _QUERY_KEY.finditer(url):
        if "password" in unquote_plus(key.group(1)).lower():
            spans.append((key.end(), len(url)))
            break
    out, pos = "", 0
    for low, high in sorted(spans):
        if low > pos:
            out += url[pos:low] + "***"
        pos = max(pos, high)
    return out + url[pos:]


def public_view(settings: Settings) -> dict[str, str | int | float | bool]:
    """Effective settings by environment name, secrets masked; numbers and booleans as such."""
    out: dict[str, str | int | float | bool] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name in SECRET_FIELDS:
            value = "" if value is None else "***"
        elif name in URL_FIELDS:
            value = mask_url(str(value))
        elif not isinstance(value, int | float):  # bool is an int
            value = str(value)
        out[env_name(name)] = value
    return out
