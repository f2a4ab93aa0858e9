"""The ledger of deletion requests and model versions: one SQLite file (stdlib ``sqlite3``), every change a
transaction.

``requests``: one row per `unlearn request add` (its ids as a JSON list and their ``ids_sha256``, a time, a note;
never the rows' content), ``state`` pending -> running (claimed by a `process` run, with the ``version`` it will
make) -> done. ``versions``: one row per published version (v1, v2, ...): its parent (``original`` for v1), how it
was made (unlearn | retrain), the forget-ids hashes of its batch and of everything forgotten up to it, the sha256
of its receipt.json and its folder. A version row and its requests' ``done`` are written in one transaction
(``publish``): a crash before it leaves the requests not done and no version recorded.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from engine.artifacts.receipt import now
from engine.data.selection import ids_sha256
from engine.errors import EngineError

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    note TEXT,
    ids_json TEXT NOT NULL,
    ids_hash TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done')),
    version TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    created TEXT NOT NULL,
    parent TEXT NOT NULL,
    made_by TEXT NOT NULL CHECK (made_by IN ('unlearn', 'retrain')),
    forget_hash_batch TEXT NOT NULL,
    forget_hash_cumulative TEXT NOT NULL,
    receipt_sha256 TEXT NOT NULL,
    folder TEXT NOT NULL
);
"""


class LedgerError(EngineError):
    """The ledger cannot be read or does not allow the change."""


def version_name(number: int) -> str:
    return f"v{number}"


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit (BEGIN)
            self.db.row_factory = sqlite3.Row
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path} is not a readable ledger ({exc})") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error): one writer at a time, all or nothing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # requests
    def add(self, ids: list, note: str | None = None) -> int:
        if not ids:
            raise LedgerError("a deletion request needs at least one id")
        if len(set(ids)) != len(ids):
            raise LedgerError("a deletion request lists an id more than once; list each id once")
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO requests (created, note, ids_json, ids_hash) VALUES (?, ?, ?, ?)",
                (now(), note, json.dumps(list(ids)), ids_sha256(ids)),
            )
            return int(cur.lastrowid)

    def requests(self, state: str | None = None) -> list[dict]:
        sql = "SELECT * FROM requests" + (" WHERE state = ?" if state else "") + " ORDER BY id"
        rows = self.db.execute(sql, (state,) if state else ()).fetchall()
        return [{**dict(r), "ids": json.loads(r["ids_json"])} for r in rows]

    def claim(self) -> tuple[str, list[dict]] | None:
        """The batch of the next version: the requests already running (a run that did not finish), else every
        pending request, now marked running with the version they will make. None: nothing to process."""
        with self.transaction() as db:
            running = db.execute("SELECT DISTINCT version FROM requests WHERE state = 'running'").fetchall()
            if len(running) > 1:
                raise LedgerError(f"requests of several versions are running ({[r[0] for r in running]})")
            if running:
                name = running[0][0]
            else:
                if not db.execute("SELECT 1 FROM requests WHERE state = 'pending'").fetchone():
                    return None
                name = version_name(self.latest_number() + 1)
                db.execute(
                    "UPDATE requests SET state = 'running', version = ? WHERE state = 'pending'", (name,)
                )
        return name, self.requests_of(name)

    def release(self) -> tuple[str | None, list[int]]:
        """Running requests back to pending, unless their version is already recorded; (their version, their
        numbers), (None, []) when none is running."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, version FROM requests WHERE state = 'running' ORDER BY id"
            ).fetchall()
            if not rows:
                return None, []
            name = rows[0]["version"]
            if db.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone():
                raise LedgerError(f"{name} is already recorded; run `unlearn request process` to finish it")
            db.execute("UPDATE requests SET state = 'pending', version = NULL WHERE state = 'running'")
        return name, [r["id"] for r in rows]

    def requests_of(self, name: str) -> list[dict]:
        rows = self.db.execute("SELECT * FROM requests WHERE version = ? ORDER BY id", (name,)).fetchall()
        return [{**dict(r), "ids": json.loads(r["ids_json"])} for r in rows]

    def forgotten_ids(self) -> list:
        """Every id of a done request: forgotten by a published version."""
        ids: dict = {}
        for r in self.requests("done"):
            ids.update(dict.fromkeys(r["ids"]))
        return list(ids)

    # versions
    def versions(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM versions ORDER BY number").fetchall()]

    def latest_number(self) -> int:
        row = self.db.execute("SELECT MAX(number) FROM versions").fetchone()
        return int(row[0] or 0)

    def publish(self, name: str, *, parent: str, made_by: str, forget_hash_batch: str,
                forget_hash_cumulative: str, receipt_sha256: str, folder: str) -> None:  # fmt: skip
        """Record version ``name`` and mark its requests done, in one transaction."""
        number = int(name.lstrip("v"))
        with self.transaction() as db:
            db.execute(
                "INSERT INTO versions (name, number, created, parent, made_by, forget_hash_batch, "
                "forget_hash_cumulative, receipt_sha256, folder) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, number, now(), parent, made_by, forget_hash_batch, forget_hash_cumulative, receipt_sha256,
                 folder),
            )  # fmt: skip
            db.execute("UPDATE requests SET state = 'done' WHERE version = ? AND state = 'running'", (name,))
