"""Before and after: an older revision of fnq against this tree, measured in turns.

    .venv/bin/python -m bench.compare REV              # 3 rounds, 3,000 calls per e2e run
    .venv/bin/python -m bench.compare REV --rounds 2 --calls 2000

REV is checked out into a temporary git worktree. Both sides run with this
tree's benchmark code (copied over the old one, so that only the product
differs) and the same virtualenv; the sides take turns, round after round, so
that a change in the machine's load hits both. Each turn is one subprocess
(``--probe``) measuring:

* e2e: one ``fnq worker`` process, Redis queue, SQLite datastore, ``fnq/echo``;
  3 runs of N calls pushed at once -> median calls/s, and the worker's CPU time
  (user + system, all its threads) per call;
* agent: ``Agent.submit`` of ``fnq/example`` sequentially and 4 at once, beside
  the raw client on the same container (bench.agent) -> agent / raw.

Prints one table with the medians over rounds, and the ratio after / before,
as text and as Markdown for the history in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, Section, Table, median

PROBE_TIMEOUT_S = 600


# ------------------------------------------------------------------- probe


async def probe_e2e(calls: int) -> dict[str, float]:
    from bench._cluster import Cluster, stop  # noqa: PLC0415
    from bench._common import label_tag  # noqa: PLC0415
    from bench.e2e import echo, fnq_throughput, warm  # noqa: PLC0415
    from tests.rig import RedisServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="fnq-compare-") as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(tmp).start()
        cluster = Cluster(tmp, f"{server.url}?prefix=c{secrets.token_hex(3)}", label_tag())
        try:
            await cluster.open()
            await cluster.register(echo())
            proc = cluster.start_worker()
            await warm(cluster, n=50)
            cpu0 = cpu_seconds(proc.pid)
            rates = await fnq_throughput(cluster, calls, 3)
            cpu_ms = 1000 * (cpu_seconds(proc.pid) - cpu0) / (3 * calls)
        finally:
            await stop(cluster)
            server.stop()
    return {"e2e calls/s": median(rates), "e2e worker CPU ms/call": cpu_ms}


async def probe_agent(calls: int) -> dict[str, float]:
    from bench._common import bench_settings, label_tag, remove_labelled  # noqa: PLC0415
    from bench.agent import hot_runs  # noqa: PLC0415
    from config.settings import Settings  # noqa: PLC0415
    from worker.agent.agent import Agent  # noqa: PLC0415
    from worker.agent.drivers.docker import DockerDriver  # noqa: PLC0415

    tag = label_tag()
    with tempfile.TemporaryDirectory(prefix="fnq-compare-") as tmp:
        extra = {"cpu_split": "off"} if "cpu_split" in Settings.model_fields else {}
        settings = bench_settings(Path(tmp) / "data", tag, freeze_idle_msecs=-1, **extra)
        driver = DockerDriver(settings)
        try:
            async with Agent(settings, driver) as agent:
                hot = await hot_runs(agent, driver, calls, 3)
        finally:
            remove_labelled(tag)
    return {"agent 1x / raw": hot["ratio 1x"], "agent 4x / raw": hot["ratio 4x"]}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def probe(calls: int) -> dict[str, float]:
    return {**await probe_e2e(calls), **await probe_agent(max(200, calls // 5))}


# ----------------------------------------------------------- orchestration


def checkout(rev: str, into: Path) -> None:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(into), rev],
        check=True,
        capture_output=True,
        timeout=120,
    )
    shutil.rmtree(into / "bench")
    shutil.copytree(REPO / "bench", into / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (into / ".venv").symlink_to(REPO / ".venv")


def remove_checkout(into: Path) -> None:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(into)],
        check=False,
        capture_output=True,
        timeout=120,
    )


def run_probe(tree: Path, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--probe", "--calls", str(calls)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=PROBE_TIMEOUT_S,
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe in {tree} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def compare(rev: str, rounds: int, calls: int) -> Table:
    with tempfile.TemporaryDirectory(prefix="fnq-before-") as tmp_name:
        before_tree = Path(tmp_name) / "tree"
        checkout(rev, before_tree)
        try:
            sides: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for i in range(rounds):
                for name, tree in (("before", before_tree), ("after", REPO)):
                    t0 = time.perf_counter()
                    sides[name].append(run_probe(tree, calls))
                    print(f"round {i + 1} {name}: {sides[name][-1]} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        finally:
            remove_checkout(before_tree)
    rows: list[list[object]] = []
    for key in sides["after"][0]:
        old = median([s[key] for s in sides["before"]])
        new = median([s[key] for s in sides["after"]])
        shown = (f"{old:.0%}", f"{new:.0%}") if "/ raw" in key else (old, new)
        rows.append([key, *shown, f"{new / old:.2f}x"])
    return Table(
        f"{rev[:12]} (before) against this tree (after), medians of {rounds} rounds",
        ["measure", "before", "after", "after / before"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", nargs="?", help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3000, help="calls per e2e run")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        from bench._common import run  # noqa: PLC0415

        print(json.dumps(run(probe(args.calls))))
        return
    if not args.rev:
        parser.error("name the revision to compare against")
    sec = Section("Before and after (bench/compare.py)")
    sec.tables.append(compare(args.rev, args.rounds, args.calls))
    sec.print()
    print("\n" + sec.markdown())


if __name__ == "__main__":
    main()
