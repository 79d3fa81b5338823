"""Prometheus metrics of one worker process, served on FN_METRICS_PORT when set.

The per-call numbers (calls by status, retries, releases, the two timing
histograms) are plain counters that the registry reads when it is scraped:
prometheus_client's own counters take a lock on every update, several
microseconds per call, whether or not anything is ever scraped. The gauges
change once per upkeep tick and use prometheus_client's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from config.domain import FINAL_STATUSES
from config.errors import ConfigError
from mq.base import QueueStats
from worker.agent.slots import LIVE_CONTAINER_STATES
from worker.agent.stats import AgentStats

HAND_BACK_REASONS = ("stop", "fault")  # the worker stopped; a passing queue or datastore fault
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Timings:
    """A histogram of seconds; ``observe`` is one bisect and two additions."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self) -> HistogramMetricFamily:
        counts, total = list(self.counts), 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), counts, strict=True):
            total += n
            buckets.append((bound, float(total)))
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)


class CallCounts(Collector):
    """The per-call counters, exported on each scrape."""

    def __init__(self) -> None:
        # Every status and reason is exported from the start, at 0: a series that
        # appears only with its first call hides that call from rate() and increase().
        self.by_status: dict[str, int] = dict.fromkeys(sorted(FINAL_STATUSES), 0)
        self.retries = 0
        self.released = 0
        self.handed_back: dict[str, int] = dict.fromkeys(HAND_BACK_REASONS, 0)
        self.queue_wait = Timings("fnq_queue_wait_seconds", "Enqueue until dispatch")
        self.run_time = Timings("fnq_run_seconds", "Dispatch until the function answered")

    def ended(self, status: str) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def went_back(self, reason: str) -> None:
        self.handed_back[reason] = self.handed_back.get(reason, 0) + 1

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "fnq_calls", "Calls that ended, by final status", labels=["status"]
        )
        for status, n in sorted(self.by_status.items()):
            calls.add_metric([status], float(n))
        yield calls
        yield CounterMetricFamily(
            "fnq_call_retries", "Failed attempts handed back for a retry", value=self.retries
        )
        yield CounterMetricFamily(
            "fnq_calls_released", "Calls handed back unstarted (no room)", value=self.released
        )
        back = CounterMetricFamily(
            "fnq_calls_handed_back",
            "Calls handed back to the queue with no attempt counted, by reason: the worker "
            "stopping, or a passing fault of the queue or the datastore",
            labels=["reason"],
        )
        for reason, n in sorted(self.handed_back.items()):
            back.add_metric([reason], float(n))
        yield back
        yield self.queue_wait.family()
        yield self.run_time.family()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = CallCounts()
        r.register(self.calls)
        self.containers = Gauge("fnq_containers", "Hot containers by state", ["state"], registry=r)
        self.calls_in_agent = Gauge("fnq_agent_calls", "Calls in the agent", ["phase"], registry=r)
        self.memory_used = Gauge("fnq_memory_used_bytes", "Memory held by containers", registry=r)
        self.memory_total = Gauge("fnq_memory_total_bytes", "Memory fnq may hand out", registry=r)
        self.cpu_used = Gauge("fnq_cpu_used_mcpus", "CPU held by containers", registry=r)
        self.cpu_total = Gauge("fnq_cpu_total_mcpus", "CPU fnq may hand out", registry=r)
        self.queue_depth = Gauge(
            "fnq_queue_messages", "Queue depth by state", ["state"], registry=r
        )
        self.recording = Gauge(
            "fnq_calls_recording",
            "Calls that have run and wait for their record to be stored and their "
            "message settled (the intake stops taking calls at a bound)",
            registry=r,
        )

    def serve(self, port: int) -> None:
        try:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)
        except OSError as exc:  # another worker of this host has it, say
            raise ConfigError(
                f"FN_METRICS_PORT={port}: cannot serve metrics there ({exc.strerror or exc}); "
                "give each worker a free port, or 0 for none"
            ) from exc

    def observe_agent(self, stats: AgentStats) -> None:
        res = stats.resources
        self.memory_used.set(res.memory_used_bytes)
        self.memory_total.set(res.memory_total_bytes)
        self.cpu_used.set(res.cpu_used_mcpus)
        self.cpu_total.set(res.cpu_total_mcpus)
        self.calls_in_agent.labels("waiting").set(stats.calls_waiting)
        self.calls_in_agent.labels("running").set(stats.calls_running)
        by_state = dict.fromkeys((state.value for state in LIVE_CONTAINER_STATES), 0)
        for queue in stats.queues:
            for state, count in queue.containers.items():
                by_state[state] = by_state.get(state, 0) + count
        for state, count in by_state.items():
            self.containers.labels(state).set(count)

    def observe_queues(self, stats: Sequence[QueueStats]) -> None:
        """The depth of this worker's queues (the main one and the RQ bridge's), summed."""
        for state in ("ready", "delayed", "reserved", "dead"):
            self.queue_depth.labels(state).set(sum(getattr(s, state) for s in stats))
