"""Run every benchmark and write docs/PERFORMANCE.md.

    .venv/bin/python -m bench            # the full set, under 10 minutes
    .venv/bin/python -m bench --quick    # fewer calls, under about 2 minutes
    .venv/bin/python -m bench --out /tmp/PERFORMANCE.md

bench.mq and bench.datastore run as they are (``--quick``, in subprocesses);
their output is copied into the report. Then bench.agent, bench.e2e,
bench.scaling and bench.memory run in this process, one after the other.
The History section at the end of the old report is kept as it is.
Function images must be built first (``fnq images build ...``; cached).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import agent, e2e, memory, scaling
from bench._common import REPO, Section, run


def _version(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "not installed"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine() -> list[tuple[str, str]]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{os.cpu_count()} cores, {cpu}"),
        ("memory", f"{mem_kb / 1024 / 1024:.1f} GiB"),
        ("kernel", platform.release()),
        ("docker", _version("docker", "version", "--format", "{{.Server.Version}}")),
        ("redis", _version("redis-server", "--version")),
        ("postgresql", _version("/usr/lib/postgresql/15/bin/postgres", "--version")),
        ("python", sys.version.split()[0]),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def existing(module: str) -> str:
    """Run bench.mq / bench.datastore --quick; their printed report."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    text = out.stdout.strip()
    print(text, flush=True)
    if out.returncode != 0:
        text += f"\n(exit {out.returncode})\n{out.stderr[-2000:]}"
    return text


def write(
    path: Path, quick: bool, sections: list[Section], olds: dict[str, str], secs: float
) -> None:
    lines = [
        "# Performance",
        "",
        "Measured by `python -m bench`"
        + (" --quick" if quick else "")
        + f" in {secs / 60:.1f} minutes. Every ratio compares runs measured in the same "
        "run on the same machine. The machine is a shared 2-core VM on which other test "
        "runs go on at the same time, so the numbers are **indicative**: medians of a "
        "few repeats, not tuned, noisy from one run to the next.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine()],
        "",
        "How to reproduce:",
        "",
        "```",
        ".venv/bin/fnq images build scripts/functions/example tests/functions/*/",
        ".venv/bin/python -m bench            # all of it, writes this file",
        ".venv/bin/python -m bench --quick    # fewer calls",
        ".venv/bin/python -m bench.e2e        # one part (also bench.agent, bench.scaling,",
        "                                     #   bench.memory, bench.mq, bench.datastore)",
        "```",
        "",
    ]
    for sec in sections:
        lines += [sec.markdown(), ""]
    for module, text in olds.items():
        lines += [f"## {module} --quick (queue and datastore alone)", "", "```", text, "```", ""]
    lines.append(kept_history(path))
    path.write_text("\n".join(lines))
    print(f"\nwrote {path}")


HISTORY = "## History"


def kept_history(path: Path) -> str:
    """The hand-kept History section at the end of the old report (before/after
    measurements of each optimisation, from bench.compare), carried over."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        return ""
    at = old.find(f"\n{HISTORY}\n")
    return old[at + 1 :] if at >= 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--out", default=str(REPO / "docs" / "PERFORMANCE.md"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    olds = {m: existing(m) for m in ("bench.mq", "bench.datastore")}
    sections = []
    for module in (agent, e2e, scaling, memory):
        print(f"\n-- {module.__name__} ...", flush=True)
        sec = run(module.measure(args.quick))
        sec.print()
        sections.append(sec)
    write(Path(args.out), args.quick, sections, olds, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
