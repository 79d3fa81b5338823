"""When a worker counts as alive, for everything that reads the heartbeats.

A worker writes its heartbeat every ``worker.upkeep.HEARTBEAT_S``; one whose
last heartbeat is at most ``ALIVE_WITHIN`` old is alive (both times by the
datastore's clock, datastore.clock): ``fnq status`` lists it, and
worker.elsewhere leaves its `running` calls to it. Kept apart from
worker.upkeep so that ``fnq status`` reads it without loading the agent.
"""

from __future__ import annotations

from datetime import timedelta

ALIVE_WITHIN = timedelta(seconds=30)
