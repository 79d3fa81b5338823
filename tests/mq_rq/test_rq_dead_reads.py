"""What dead_among, dead_requeue and dead_purge ask Redis, given ids: about those ids
only, however many dead letters the FailedJobRegistry holds. The commands the server
runs are read with MONITOR."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from mq.rq import RQQueue
from mq.rq_dead import MEMBERSHIP_BATCH

MakeRQ = Callable[..., RQQueue]
QUEUES = ("high", "default")
OTHERS = 2_000  # dead letters not asked about
WHOLE_READS = {"ZRANGE", "ZREVRANGE", "ZRANGEBYSCORE", "ZSCAN", "ZRANGESTORE", "ZUNION"}


def failed_key(name: str) -> str:
    return FailedJobRegistry(name).key


def pad(conn: Redis, name: str, count: int) -> None:
    """``count`` FAILED jobs of queue ``name`` in its FailedJobRegistry, as rq keeps them."""
    registry = FailedJobRegistry(name, connection=conn, serializer=JSONSerializer)
    with conn.pipeline() as pipe:
        for i in range(count):
            job = Job.create("fnq.call", kwargs={"app": "demo", "fn": "echo"}, connection=conn,
                             id=f"other-{name}-{i:05d}", origin=name, status=JobStatus.FAILED,
                             serializer=JSONSerializer)  # fmt: skip
            job.save(pipeline=pipe)
            registry.add(job, ttl=3600, pipeline=pipe)
        pipe.execute()


async def dead_letters(conn: Redis, queue: RQQueue) -> dict[str, str]:
    """One dead letter of each queue, made as a worker makes them; id -> its queue."""
    made: dict[str, str] = {}
    for name in QUEUES:
        job = Queue(name, connection=conn, serializer="json").enqueue(
            "fnq.call", app="demo", fn="echo"
        )
        msg = await queue.reserve(1.0)
        assert msg is not None and msg.call.id == job.id
        await queue.dead_letter(msg, "gave up")
        made[job.id] = name
    return made


@contextlib.contextmanager
def commands_run(url: str, conn: Redis) -> Iterator[list[list[str]]]:
    """The commands the server runs in the block (MONITOR), each as its words, the
    command's name in capitals."""
    seen: list[list[str]] = []
    end = f"end-of-block-{secrets.token_hex(4)}"
    watcher = Redis.from_url(url, socket_timeout=10)
    try:
        with watcher.monitor() as monitor:
            yield seen
            conn.echo(end)
            while True:
                words = str(monitor.next_command()["command"]).split()
                if words == ["ECHO", end]:
                    break
                seen.append([words[0].upper(), *words[1:]])
    finally:
        watcher.close()


def registry_reads(commands: list[list[str]]) -> list[list[str]]:
    """The commands that read a FailedJobRegistry: a ZMSCORE names the ids it asks about."""
    keys = {failed_key(n) for n in QUEUES}
    return [c for c in commands if len(c) > 1 and c[1] in keys]


def asked(commands: list[list[str]]) -> list[str]:
    return [i for c in commands if c[0] == "ZMSCORE" for i in c[2:]]


async def test_dead_among_asks_about_the_ids_given_only(
    make_rq: MakeRQ, conn: Redis, rq_url: str
) -> None:
    queue = make_rq(QUEUES)
    dead = list(await dead_letters(conn, queue))
    for name in QUEUES:
        pad(conn, name, OTHERS)
    ids = [dead[1], "no-such-id", dead[0], dead[1]]
    with commands_run(rq_url, conn) as commands:
        assert await queue.dead_among(ids) == [dead[1], dead[0], dead[1]]
    reads = registry_reads(commands)
    assert {c[0] for c in reads} == {"ZMSCORE"}  # never the whole registry
    assert sorted(asked(reads)) == sorted([dead[1], "no-such-id", dead[0]] * len(QUEUES))
    assert len(commands) == len(QUEUES)  # nothing else: one ZMSCORE per registry


async def test_dead_among_asks_in_batches(make_rq: MakeRQ, conn: Redis, rq_url: str) -> None:
    queue = make_rq(QUEUES)
    dead = list(await dead_letters(conn, queue))
    unknown = [f"none-{i}" for i in range(2 * MEMBERSHIP_BATCH + 10)]
    with commands_run(rq_url, conn) as commands:
        assert await queue.dead_among([*unknown, *dead]) == dead  # the last batch finds them
    sizes = [len(c) - 2 for c in commands if c[0] == "ZMSCORE"]
    assert sizes == [MEMBERSHIP_BATCH] * 4 + [len(unknown) + 2 - 2 * MEMBERSHIP_BATCH] * 2


async def test_dead_requeue_and_purge_touch_the_ids_given_only(
    make_rq: MakeRQ, conn: Redis, rq_url: str
) -> None:
    queue = make_rq(QUEUES)
    dead = await dead_letters(conn, queue)
    first, second = dead
    for name in QUEUES:
        pad(conn, name, OTHERS)

    with commands_run(rq_url, conn) as commands:
        assert await queue.dead_requeue([second, "no-such-id", first, second]) == 2
    reads = registry_reads(commands)
    assert not WHOLE_READS & {c[0] for c in reads}
    assert sorted(asked(reads)) == sorted([second, "no-such-id", first] * len(QUEUES))
    assert not [c for c in commands if any("other-" in w for w in c)]
    for job_id, name in dead.items():
        assert Job.fetch(job_id, connection=conn, serializer="json").get_status() == "queued"
        assert conn.zscore(failed_key(name), job_id) is None
    assert [conn.zcard(failed_key(n)) for n in QUEUES] == [OTHERS, OTHERS]

    for _ in dead:  # dead again, then purged
        msg = await queue.reserve(1.0)
        assert msg is not None
        await queue.dead_letter(msg, "gave up again")
    with commands_run(rq_url, conn) as commands:
        assert await queue.dead_purge([first, "no-such-id", second, first]) == 2
    reads = registry_reads(commands)
    assert not WHOLE_READS & {c[0] for c in reads}
    assert sorted(asked(reads)) == sorted([first, "no-such-id", second] * len(QUEUES))
    assert not [c for c in commands if any("other-" in w for w in c)]
    assert not conn.exists(Job.key_for(first)) and not conn.exists(Job.key_for(second))
    assert [conn.zcard(failed_key(n)) for n in QUEUES] == [OTHERS, OTHERS]
