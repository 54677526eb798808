"""
The store: bindings on disk, so that a restart (or a C{kill -9}) forgets no
device.

L{SQLiteStore} buffers the changes of a reactor turn (L{WriteBuffer}) and
writes them in one transaction when the registrar commits, before any answer
about them leaves.  The journal is WAL with C{synchronous=NORMAL}: a commit
survives the process dying at any point; only a power loss can take the last
few commits.

The schema is upgraded by explicit steps (L{MIGRATIONS}), one per version,
each in its own transaction.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterator, Optional

from zope.interface import implementer

from natkeep.bindings import Binding, StoredBinding, storedRow
from natkeep.interfaces import IBindingStore

#: The steps that take a database from version N to N+1, at index N.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the bindings table, with an index for the expiry sweep.
    """
    CREATE TABLE bindings (
        aor TEXT NOT NULL,
        uri TEXT NOT NULL,
        params TEXT NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        listener TEXT NOT NULL,
        nat INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        call_id TEXT NOT NULL,
        cseq INTEGER NOT NULL,
        PRIMARY KEY (aor, uri)
    );
    CREATE INDEX bindings_expiry ON bindings (expires_at);
    """,
    # 1 -> 2: no index on expires_at.  Every write paid for it, and only a
    # restart read it.
    """
    DROP INDEX IF EXISTS bindings_expiry;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

#: The columns in L{StoredBinding}'s field order.
_COLUMNS = "aor, uri, params, host, port, listener, nat, expires_at, call_id, cseq"

_UPSERT = f"""
INSERT INTO bindings ({_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (aor, uri) DO UPDATE SET
    params = excluded.params, host = excluded.host, port = excluded.port,
    listener = excluded.listener, nat = excluded.nat,
    expires_at = excluded.expires_at, call_id = excluded.call_id,
    cseq = excluded.cseq
"""


class StoreError(Exception):
    """
    The binding database cannot be used; the message names the file.
    """


class WriteBuffer:
    """
    The changes of a reactor turn, waiting for a commit: the latest put of
    each binding, and the deletions.  Every store keeps its writes here.
    """

    def __init__(self) -> None:
        self._puts: dict[tuple[str, str], Binding] = {}
        self._deletes: set[tuple[str, str]] = set()

    def put(self, binding: Binding) -> None:
        key = (binding.aor, binding.uri)
        self._deletes.discard(key)
        self._puts[key] = binding

    def delete(self, binding: Binding) -> None:
        key = (binding.aor, binding.uri)
        self._puts.pop(key, None)
        self._deletes.add(key)

    def pending(self) -> bool:
        return bool(self._puts or self._deletes)

    def takeWrites(self) -> tuple[dict[tuple[str, str], Binding], set[tuple[str, str]]]:
        """
        Hand over the buffered writes and start a new buffer.
        """
        puts, self._puts = self._puts, {}
        deletes, self._deletes = self._deletes, set()
        return puts, deletes

    def restoreWrites(
        self, puts: dict[tuple[str, str], Binding], deletes: set[tuple[str, str]]
    ) -> None:
        """
        Put back writes a failed commit took, under any made since.
        """
        for key in self._deletes:
            puts.pop(key, None)
        deletes -= self._puts.keys()
        puts.update(self._puts)
        self._puts = puts
        self._deletes |= deletes


@implementer(IBindingStore)
class SQLiteStore(WriteBuffer):
    """
    Bindings in an SQLite file.

    @ivar location: the database file.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.location = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._db.execute("SELECT count(*) FROM bindings").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"cannot use binding database {path}: {e}")

    def _migrate(self) -> None:
        """
        Bring the schema to L{SCHEMA_VERSION}, one step at a time.
        """
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"binding database {self.location} has schema version {version}, "
                f"newer than this natkeep's {SCHEMA_VERSION}"
            )
        if (
            version == 0
            and db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'bindings'"
            ).fetchone()
        ):
            # Written before the version was recorded: the first schema.
            version = 1
        for step in range(version, SCHEMA_VERSION):
            db.execute("BEGIN")
            try:
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={step + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def load(self, now: float) -> Iterator[StoredBinding]:
        self._db.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,))
        cursor = self._db.execute(f"SELECT {_COLUMNS} FROM bindings ORDER BY rowid")
        make = StoredBinding._make
        for row in cursor:
            yield make(row)

    def commit(self) -> None:
        puts, deletes = self.takeWrites()
        db = self._db
        try:
            db.execute("BEGIN")
            if deletes:
                db.executemany("DELETE FROM bindings WHERE aor = ? AND uri = ?", deletes)
            if puts:
                # Values are read now, so several changes in one turn
                # cost one row write.
                db.executemany(_UPSERT, [storedRow(b) for b in puts.values()])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            # Keep the writes for the next attempt.
            self.restoreWrites(puts, deletes)
            raise

    def count(self, now: float, natOnly: bool = False) -> int:
        query = "SELECT count(*) FROM bindings WHERE expires_at > ?"
        if natOnly:
            query += " AND nat = 1"
        return int(self._db.execute(query, (now,)).fetchone()[0])

    def close(self) -> None:
        if self.pending():
            self.commit()
        self._db.close()


def storedCount(path: str, now: float, natOnly: bool) -> Optional[int]:
    """
    How many live bindings the database at C{path} holds, without creating
    it; L{None} when there is no such file.

    @raise StoreError: when it cannot be read.
    """
    if not os.path.exists(path):
        return None
    store = SQLiteStore(path)
    try:
        return store.count(now, natOnly)
    finally:
        store.close()
