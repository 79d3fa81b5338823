"""The request a call was made with: what the writes store, and a call rebuilt from it.

The first write that creates a call's record (``record_queued``, ``record_running``,
or an outcome for a call that never ran) carries the request in the same statement;
``retry_call`` turns it back into a Call to push.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from config.domain import Call, frozen_map
from datastore.base import CallRecord
from datastore.errors import CallNotFinal, CallNotFound, RequestNotStored

NO_REQUEST: dict[str, Any] = {
    "request_body": None,
    "request_headers": None,
    "request_priority": None,
}


def request_params(call: Call, max_bytes: int) -> dict[str, Any]:
    """The request columns for ``call``; none when its body is over ``max_bytes``
    (the queue refuses such bodies, so only a producer with a larger limit sends one,
    and a cut body could not be run again)."""
    if len(call.body) > max_bytes:
        return dict(NO_REQUEST)
    return {
        "request_body": call.body,
        "request_headers": json.dumps(dict(call.headers), sort_keys=True),
        "request_priority": call.priority,
    }


def retryable(call_id: str, rec: CallRecord | None) -> CallRecord:
    """``rec`` if it can be retried, else the StoreError saying why not."""
    if rec is None:
        raise CallNotFound(call_id)
    if not rec.is_final:
        raise CallNotFinal(call_id, rec.status.value)
    if not rec.has_request or rec.request_body is None:
        raise RequestNotStored(call_id)
    return rec


def rebuilt_call(rec: CallRecord, now: datetime) -> Call:
    """The Call ``rec`` was made with, created ``now`` (so its max age starts again)."""
    return Call(
        id=rec.id,
        app=rec.app,
        fn=rec.fn,
        body=rec.request_body or b"",
        headers=frozen_map(rec.request_headers),
        created_at=now,
        priority=rec.request_priority,
    )
