"""Prometheus metrics of one worker process, served on FN_METRICS_PORT when set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.agent.stats import AgentStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "fnq_calls", "Calls that ended, by final status", ["status"], registry=r
        )
        self.retries = Counter(
            "fnq_call_retries", "Failed attempts handed back for a retry", registry=r
        )
        self.released = Counter(
            "fnq_calls_released", "Calls handed back unstarted (no room)", registry=r
        )
        self.queue_wait = Histogram(
            "fnq_queue_wait_seconds", "Enqueue until dispatch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.run_time = Histogram(
            "fnq_run_seconds",
            "Dispatch until the function answered",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.containers = Gauge("fnq_containers", "Hot containers by state", ["state"], registry=r)
        self.calls_in_agent = Gauge("fnq_agent_calls", "Calls in the agent", ["phase"], registry=r)
        self.memory_used = Gauge("fnq_memory_used_bytes", "Memory held by containers", registry=r)
        self.memory_total = Gauge("fnq_memory_total_bytes", "Memory fnq may hand out", registry=r)
        self.cpu_used = Gauge("fnq_cpu_used_mcpus", "CPU held by containers", registry=r)
        self.cpu_total = Gauge("fnq_cpu_total_mcpus", "CPU fnq may hand out", registry=r)
        self.queue_depth = Gauge(
            "fnq_queue_messages", "Queue depth by state", ["state"], registry=r
        )

    def serve(self, port: int) -> None:
        start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def observe_agent(self, stats: AgentStats) -> None:
        res = stats.resources
        self.memory_used.set(res.memory_used_bytes)
        self.memory_total.set(res.memory_total_bytes)
        self.cpu_used.set(res.cpu_used_mcpus)
        self.cpu_total.set(res.cpu_total_mcpus)
        self.calls_in_agent.labels("waiting").set(stats.calls_waiting)
        self.calls_in_agent.labels("running").set(stats.calls_running)
        self.containers.labels("live").set(stats.containers)
