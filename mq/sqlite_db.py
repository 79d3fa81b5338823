"""The SQLite queue's storage: one connection, used from one thread, short transactions.

One table holds every live message. ``state`` 0 means visible; 1 means waiting
until ``due_ms``: delayed when ``receipt`` is NULL, reserved otherwise. A
reserve transaction first turns due rows visible (or buries rows whose last
reservation lapsed after ``max_deliveries``), then takes the first visible rows
by ``priority DESC, seq``. A row keeps its ``seq`` when it comes back, so a lapsed
or released message keeps its place in line.

Other processes may insert rows directly (``INSERT INTO mq_message(id, payload)``
with the JSON form of mq.wire); malformed rows are dead-lettered at reserve.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NamedTuple

from config.domain import Call
from config.sqlite import create_private, enable_wal
from mq import wire
from mq.base import LAPSED_REASON, DeadLetter, Message, QueueStats, lapsed_reason
from mq.errors import QueueError

SCHEMA = """
CREATE TABLE IF NOT EXISTS mq_message (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    priority INTEGER NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 2),
    state INTEGER NOT NULL DEFAULT 0,
    due_ms INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS mq_message_visible ON mq_message (priority DESC, seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS mq_message_waiting ON mq_message (due_ms) WHERE state = 1;
CREATE TABLE IF NOT EXISTS mq_dead (
    id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    deliveries INTEGER NOT NULL,
    died_ms INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS mq_dead_died ON mq_dead (died_ms);
"""

_SCHEMA_OBJECTS = tuple(re.findall(r"IF NOT EXISTS (\w+)", SCHEMA))


def _has_schema(conn: sqlite3.Connection) -> bool:
    """Whether every table and index of SCHEMA is in the file (read without a lock)."""
    marks = ",".join("?" * len(_SCHEMA_OBJECTS))
    query = f"SELECT COUNT(*) FROM sqlite_master WHERE name IN ({marks})"
    return bool(conn.execute(query, _SCHEMA_OBJECTS).fetchone()[0] == len(_SCHEMA_OBJECTS))


# A message buried for too many deliveries: SQLite's printf() writes mq.base.LAPSED_REASON
# into its dead letter (_BURY_LAPSED), and lapsed_reason into what its worker is told.
_BURY_LAPSED = """
INSERT OR REPLACE INTO mq_dead (id, reason, deliveries, died_ms, priority, payload)
SELECT id, printf(:reason, deliveries), deliveries, :now, priority, payload
FROM mq_message WHERE state = 1 AND due_ms <= :now AND receipt IS NOT NULL
                  AND deliveries >= :max
"""
_LAPSED = """
SELECT id, deliveries FROM mq_message WHERE state = 1 AND due_ms <= :now AND receipt IS NOT NULL
                                      AND deliveries >= :max
"""
_DELETE_LAPSED = """
DELETE FROM mq_message WHERE state = 1 AND due_ms <= :now AND receipt IS NOT NULL
                        AND deliveries >= :max
"""
_BURY_ONE = """
INSERT OR REPLACE INTO mq_dead (id, reason, deliveries, died_ms, priority, payload)
SELECT :dead_id, :reason, deliveries, :now, priority, payload FROM mq_message
WHERE seq = :seq AND id = :id
"""

# The row of one delivery (receipt ``seq:token``, delivery number :n): still held by it, or
# lapsed since (whether delivered again or not). Not once that delivery was released (its
# count was taken back), nor a later message of the same id (a seq may be used again).
_DELIVERY = (
    "seq = :seq AND id = :id AND (receipt = :token OR deliveries > :n"
    " OR (receipt IS NULL AND deliveries = :n))"
)
_BURY_DELIVERY = f"""
INSERT OR REPLACE INTO mq_dead (id, reason, deliveries, died_ms, priority, payload)
SELECT id, :reason, deliveries, :now, priority, payload FROM mq_message WHERE {_DELIVERY}
"""


_STATS = """
SELECT (SELECT COUNT(*) FROM mq_message),
       (SELECT COUNT(*) FROM mq_message WHERE state = 1),
       (SELECT COUNT(receipt) FROM mq_message WHERE state = 1),
       (SELECT COUNT(*) FROM mq_dead)
"""


class Reserved(NamedTuple):
    msgs: list[Message]
    next_due: int | None  # when nothing was taken: the next due time (ms), if any
    version: int  # the data version after the transaction
    buried: list[tuple[str, str]]  # (id, reason) of the rows this reserve buried


def dead_id(msg_id: object) -> str:
    """The id of a row's dead letter: the row's, as text. A BLOB id (written by another
    program) is read as UTF-8, a byte that is not shown as ``\\xNN``, so that ``fnq
    dead requeue ID`` and ``fnq dead purge ID`` can name it; requeued, the row has
    that text id."""
    if isinstance(msg_id, bytes):
        return msg_id.decode("utf-8", "backslashreplace")
    return str(msg_id)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _split_receipt(msg: Message) -> tuple[int, str]:
    seq, _, token = msg.receipt.partition(":")
    return int(seq), token


def _delivery(msg: Message) -> dict[str, object]:
    seq, token = _split_receipt(msg)
    return {"seq": seq, "id": msg.call.id, "token": token, "n": msg.deliveries}


class SqliteDb:
    """Blocking operations; call them from the queue's own thread only."""

    def __init__(
        self,
        path: Path,
        *,
        reservation_ms: int,
        max_deliveries: int,
        max_body_bytes: int,
        busy_timeout_ms: int,
        create: bool = True,
    ) -> None:
        self.path = path
        self.create = create  # False: a file that does not exist is an error, not made
        self.reservation_ms = reservation_ms
        self.max_deliveries = max_deliveries
        self.max_body_bytes = max_body_bytes
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------ plumbing
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.create and not self.path.exists():
                raise QueueError(
                    f"no queue at {self.path} (FN_MQ_URL); a worker or `fnq call` creates it"
                )
            try:
                create_private(self.path)
            except OSError as exc:  # a file in the way, no permission
                raise QueueError(f"cannot make the queue's directory or file: {exc}") from exc
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            enable_wal(conn, self.busy_timeout_ms / 1000)
            conn.execute("PRAGMA synchronous = NORMAL")
            if not _has_schema(conn):  # only then the write lock: readers need not wait
                with self._tx(conn):
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
            self._conn = conn
        return self._conn

    @staticmethod
    @contextmanager
    def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._tx(self.conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def data_version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    # ------------------------------------------------------------- produce
    def push(self, items: Sequence[tuple[Call, int, float]]) -> int:
        """Insert the messages whose ids are not on the queue; returns how many were."""
        now = now_ms()
        rows = [
            (c.id, prio, 1 if delay_s > 0 else 0, now + int(delay_s * 1000), wire.call_json(c))
            for c, prio, delay_s in items
        ]
        with self.write() as conn:
            return conn.executemany(
                "INSERT INTO mq_message (id, priority, state, due_ms, payload) VALUES (?,?,?,?,?)"
                " ON CONFLICT (id) DO NOTHING",
                rows,
            ).rowcount

    # ------------------------------------------------------------- consume
    def reserve(self, count: int) -> Reserved:
        """Up to ``count`` messages; also the next due time, the data version and the
        rows buried on the way."""
        out: list[Message] = []
        token = secrets.token_hex(6)
        with self.write() as conn:
            now = now_ms()  # after the lock: a wait for it must not shorten the reservation
            buried = self._sweep(conn, now)
            while len(out) < count:
                rows = conn.execute(
                    "SELECT seq, id, priority, deliveries, payload FROM mq_message WHERE state = 0"
                    " ORDER BY priority DESC, seq LIMIT ?",
                    (count - len(out),),
                ).fetchall()
                if not rows:
                    break
                conn.executemany(
                    "UPDATE mq_message SET state = 1, due_ms = ?, receipt = ?,"
                    " deliveries = deliveries + 1 WHERE seq = ?",
                    [(now + self.reservation_ms, token, r[0]) for r in rows],
                )
                for seq, msg_id, prio, deliveries, payload in rows:
                    try:
                        call = self._decode_row(msg_id, prio, payload, now)
                    except wire.WireError as exc:
                        reason = f"malformed message: {exc}"
                        self._bury(conn, seq, msg_id, reason, now)
                        if isinstance(msg_id, str):
                            buried.append((msg_id, reason))
                        continue
                    out.append(Message(call, deliveries + 1, f"{seq}:{token}", prio))
            next_due = None
            if not out:
                next_due = conn.execute(
                    "SELECT MIN(due_ms) FROM mq_message WHERE state = 1"
                ).fetchone()[0]
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        return Reserved(out, next_due, version, buried)

    def _decode_row(self, msg_id: object, prio: int, payload: object, now: int) -> Call:
        """The call of a row taken at ``now``, or WireError."""
        # A row of another program may lack `created`: it was made about when it is
        # first taken (not in 1970, which would expire it at once).
        if not isinstance(msg_id, str):  # a BLOB: SQLite keeps it so in a TEXT column
            raise wire.WireError(f"the row's id {msg_id!r} is a BLOB, not text")
        call = wire.decode_json(payload, prio, self.max_body_bytes, default_created_ms=now)
        if call.id != msg_id:  # acks and dead letters go by the row's id
            raise wire.WireError(f"payload id {call.id!r} is not the row's id {msg_id!r}")
        return call

    def _sweep(self, conn: sqlite3.Connection, now: int) -> list[tuple[str, str]]:
        """Rows due at ``now`` visible again, or buried after too many deliveries;
        returns (id, reason) of those buried."""
        due = conn.execute(
            "SELECT 1 FROM mq_message WHERE state = 1 AND due_ms <= ? LIMIT 1", (now,)
        ).fetchone()
        if due is None:
            return []
        args = {"now": now, "max": self.max_deliveries}
        lapsed = conn.execute(_LAPSED, args).fetchall()
        if lapsed:
            conn.execute(_BURY_LAPSED, {**args, "reason": LAPSED_REASON})
            conn.execute(_DELETE_LAPSED, args)
        conn.execute(
            "UPDATE mq_message SET state = 0, receipt = NULL WHERE state = 1 AND due_ms <= ?",
            (now,),
        )
        return [(i, lapsed_reason(n)) for i, n in lapsed if isinstance(i, str)]

    def _bury(
        self, conn: sqlite3.Connection, seq: int, msg_id: object, reason: str, now: int
    ) -> None:
        args = {"dead_id": dead_id(msg_id), "reason": reason, "now": now, "seq": seq, "id": msg_id}
        conn.execute(_BURY_ONE, args)
        conn.execute("DELETE FROM mq_message WHERE seq = ? AND id = ?", (seq, msg_id))

    def ack(self, msgs: Sequence[Message]) -> None:
        with self.write() as conn:
            conn.executemany(f"DELETE FROM mq_message WHERE {_DELIVERY}", map(_delivery, msgs))

    def release(self, msgs: Sequence[Message], delay_s: float) -> None:
        now = now_ms()
        state, due = (1, now + int(delay_s * 1000)) if delay_s > 0 else (0, 0)
        with self.write() as conn:
            conn.executemany(
                "UPDATE mq_message SET state = ?, due_ms = ?, receipt = NULL,"
                " deliveries = MAX(deliveries - 1, 0)"
                " WHERE seq = ? AND receipt = ? AND state = 1",
                [(state, due, *_split_receipt(m)) for m in msgs],
            )

    def extend(self, msg: Message) -> bool:
        seq, token = _split_receipt(msg)
        with self.write() as conn:
            cur = conn.execute(
                "UPDATE mq_message SET due_ms = ? WHERE seq = ? AND receipt = ? AND state = 1",
                (now_ms() + self.reservation_ms, seq, token),
            )
            return cur.rowcount > 0

    def dead_letter(self, msg: Message, reason: str) -> None:
        args = {**_delivery(msg), "reason": reason, "now": now_ms()}
        with self.write() as conn:
            conn.execute(_BURY_DELIVERY, args)
            conn.execute(f"DELETE FROM mq_message WHERE {_DELIVERY}", args)

    # --------------------------------------------------------- dead letters
    def dead_list(self, limit: int) -> list[DeadLetter]:
        rows = self.conn.execute(
            "SELECT id, reason, deliveries, died_ms, priority, payload FROM mq_dead"
            " ORDER BY died_ms, id LIMIT ?",
            (limit,),
        ).fetchall()
        out = []
        for msg_id, reason, deliveries, died_ms, prio, payload in rows:
            raw = payload if isinstance(payload, bytes) else str(payload).encode()
            try:
                call: Call | None = wire.decode_json(raw, prio, self.max_body_bytes)
            except wire.WireError:
                call = None
            out.append(DeadLetter(msg_id, reason, deliveries, wire.from_ms(died_ms), raw, call))
        return out

    def _dead_where(self, ids: Sequence[str] | None) -> tuple[str, list[str]]:
        if ids is None:
            return "", []
        return f" WHERE id IN ({','.join('?' * len(ids))})", list(ids)

    def dead_among(self, ids: Sequence[str]) -> list[str]:
        where, args = self._dead_where(ids)
        found = {row[0] for row in self.conn.execute("SELECT id FROM mq_dead" + where, args)}
        return [i for i in ids if i in found]

    def dead_requeue(self, ids: Sequence[str] | None) -> int:
        where, args = self._dead_where(ids)
        with self.write() as conn:
            conn.execute(
                # A requeued call's age starts again: its creation time is now.
                "INSERT OR IGNORE INTO mq_message (id, priority, state, due_ms, payload)"
                " SELECT id, priority, 0, 0, CASE WHEN json_valid(CAST(payload AS TEXT)) THEN"
                " CAST(json_set(CAST(payload AS TEXT), '$.created', ?) AS BLOB) ELSE payload END"
                " FROM mq_dead" + where,
                [now_ms(), *args],
            )
            return conn.execute("DELETE FROM mq_dead" + where, args).rowcount

    def dead_purge(self, ids: Sequence[str] | None) -> int:
        where, args = self._dead_where(ids)
        with self.write() as conn:
            return conn.execute("DELETE FROM mq_dead" + where, args).rowcount

    def stats(self) -> QueueStats:
        """The depth by state, at one instant. Counted in indexes: all messages in the
        smallest, the waiting ones (delayed or reserved: few, unless many calls are
        delayed) in their own, so that the payloads of a deep queue are not read."""
        total, waiting, reserved, dead = self.conn.execute(_STATS).fetchone()
        return QueueStats(total - waiting, waiting - reserved, reserved, dead)
