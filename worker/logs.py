"""The worker's own log: text for people, JSON lines for log pipelines.

Every record logged in the handling of a call carries that call's id
(``call_id``), whichever module logs it: the call task sets a context
variable, and asyncio copies it into every task the call starts. Tasks that
outlive the call that started them (a hot container's, from its image pull
and start to its removal; a launcher's) start with a fresh context: their
records name no call.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

from config.settings import Settings

current_call: ContextVar[str | None] = ContextVar("fnq_call_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(call)s: %(message)s"


class CallIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        call_id = current_call.get()
        record.call_id = call_id
        record.call = f" [{call_id}]" if call_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        call_id = getattr(record, "call_id", None)
        if call_id:
            doc["call_id"] = call_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
