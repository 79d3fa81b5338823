"""The worker's per-call metrics, as a Prometheus scrape sees them."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import generate_latest

from config.errors import ConfigError
from worker.agent.resources import ResourceStats
from worker.agent.stats import AgentStats, QueueStats
from worker.metrics import Metrics


def test_per_call_counters_and_histograms_are_exported() -> None:
    m = Metrics()
    for status in ("success", "success", "error"):
        m.calls.ended(status)
    m.calls.retries += 2
    m.calls.released += 1
    m.calls.went_back("stop")
    m.calls.went_back("stop")
    m.calls.went_back("fault")
    for seconds in (0.0005, 0.001, 0.003, 100.0):  # 0.001 is in the 0.001 bucket (le)
        m.calls.queue_wait.observe(seconds)
    m.calls.run_time.observe(0.02)
    text = generate_latest(m.registry).decode()
    for line in (
        'fnq_calls_total{status="success"} 2.0',
        'fnq_calls_total{status="error"} 1.0',
        "fnq_call_retries_total 2.0",
        "fnq_calls_released_total 1.0",
        'fnq_calls_handed_back_total{reason="stop"} 2.0',
        'fnq_calls_handed_back_total{reason="fault"} 1.0',
        'fnq_queue_wait_seconds_bucket{le="0.001"} 2.0',
        'fnq_queue_wait_seconds_bucket{le="0.0025"} 2.0',
        'fnq_queue_wait_seconds_bucket{le="0.005"} 3.0',
        'fnq_queue_wait_seconds_bucket{le="60.0"} 3.0',
        'fnq_queue_wait_seconds_bucket{le="+Inf"} 4.0',
        "fnq_queue_wait_seconds_count 4.0",
        "fnq_queue_wait_seconds_sum 100.0045",
        'fnq_run_seconds_bucket{le="0.025"} 1.0',
        'fnq_run_seconds_bucket{le="0.01"} 0.0',
        "fnq_run_seconds_count 1.0",
    ):
        assert line in text, (line, text)


def test_containers_are_counted_by_state_over_all_functions() -> None:
    def queue(key: str, **containers: int) -> QueueStats:
        return QueueStats(key, f"a/{key}", containers, 0, 0, 0)

    res = ResourceStats(0, 0, 0, 0, 0)
    stats = AgentStats(
        res,
        (queue("f", idle=2, busy=1, paused=0), queue("g", busy=3, start=1, wait=1, paused=4)),
        evictions=0,
        closing=False,
    )
    m = Metrics()
    m.observe_agent(stats)
    text = generate_latest(m.registry).decode()
    for state, count in (("idle", 2), ("busy", 4), ("paused", 4), ("start", 1), ("wait", 1)):
        assert f'fnq_containers{{state="{state}"}} {count}.0' in text, text
    assert 'state="live"' not in text


def test_a_metrics_port_in_use_is_one_sentence_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^FN_METRICS_PORT={port}: cannot serve metrics"):
            Metrics().serve(port)


def test_every_status_and_reason_is_exported_before_its_first_call() -> None:
    text = generate_latest(Metrics().registry).decode()
    for status in ("success", "error", "timeout", "cancelled"):
        assert f'fnq_calls_total{{status="{status}"}} 0.0' in text, text
    for reason in ("stop", "fault"):
        assert f'fnq_calls_handed_back_total{{reason="{reason}"}} 0.0' in text, text
