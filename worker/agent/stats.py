"""Frozen snapshots of the agent's state, for metrics and ``fnq status``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from worker.agent.resources import ResourceStats
from worker.agent.slots import ContainerState, RequestState, SlotQueue


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One function configuration: its containers by state and its calls."""

    key: str
    fn_ref: str
    containers: Mapping[str, int]  # by ContainerState value, live states only
    calls_waiting: int
    calls_running: int
    containers_started: int

    @property
    def containers_live(self) -> int:
        return sum(self.containers.values())

    @classmethod
    def of(cls, queue: SlotQueue) -> QueueStats:
        return cls(
            key=queue.key,
            fn_ref=queue.fn.ref,
            containers={
                state.value: queue.containers[state]
                for state in ContainerState
                if state is not ContainerState.DONE
            },
            calls_waiting=queue.requests[RequestState.WAIT],
            calls_running=queue.requests[RequestState.EXEC],
            containers_started=queue.containers_started,
        )


@dataclass(frozen=True, slots=True)
class AgentStats:
    resources: ResourceStats
    queues: tuple[QueueStats, ...]
    evictions: int
    closing: bool
    displacements: int = 0  # busy containers that left after their call for a launch

    @property
    def containers(self) -> int:
        return sum(q.containers_live for q in self.queues)

    @property
    def calls_running(self) -> int:
        return sum(q.calls_running for q in self.queues)

    @property
    def calls_waiting(self) -> int:
        return sum(q.calls_waiting for q in self.queues)

    def queue(self, fn_ref: str) -> QueueStats | None:
        """The first queue of ``app/fn`` (one per configuration of it)."""
        return next((q for q in self.queues if q.fn_ref == fn_ref), None)
