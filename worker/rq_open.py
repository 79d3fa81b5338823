"""The RQ queues named by FN_RQ_QUEUES, for the worker and for ``fnq status``.

Apart from worker.runtime so that ``fnq status`` opens them without loading
the agent; rq itself is imported only when queues are named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from config.errors import ConfigError
from config.settings import Settings
from mq.base import REDIS_SCHEMES, MessageQueue

if TYPE_CHECKING:
    from mq.rq import RQQueue


def rq_names(settings: Settings) -> list[str]:
    return [n.strip() for n in settings.rq_queues.split(",") if n.strip()]


def open_rq(settings: Settings) -> RQQueue | None:
    """One RQQueue over the RQ queues named by FN_RQ_QUEUES; None when none are."""
    names = rq_names(settings)
    if not names:
        return None
    url = settings.rq_url or settings.mq_url
    if url.partition("://")[0].lower() not in REDIS_SCHEMES:
        raise ConfigError(
            "FN_RQ_QUEUES needs a Redis: set FN_RQ_URL=redis://HOST:PORT/DB or unix:///SOCKET?db=DB"
        )
    from mq.rq import open_rq_queues  # noqa: PLC0415 - rq is imported only when used

    return open_rq_queues(url, names, settings)


def rq_queues(settings: Settings) -> list[MessageQueue]:
    """The RQ queues named by FN_RQ_QUEUES, if any, as a list to serve."""
    queue = open_rq(settings)
    return [] if queue is None else [queue]
