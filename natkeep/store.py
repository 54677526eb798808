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

Every row keeps when the REGISTER that made it arrived (C{modified}, from
L{Binding.modified}).  An upsert replaces a row and a delete removes it only
when the writing copy is at least as new: workers and nodes share the store,
and a commit from one the device has just left may land after the commit of
the one it moved to.
"""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from zope.interface import implementer

from natkeep.bindings import Binding, StoredBinding, storedRow
from natkeep.interfaces import IBindingReader, IBindingStore

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

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
    # 2 -> 3: when the REGISTER behind each row arrived; rows from before
    # count as oldest.
    """
    ALTER TABLE bindings ADD COLUMN modified REAL NOT NULL DEFAULT 0;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

#: Seconds a commit waits for another process's lock on the database
#: before it fails.  Commits wait on the store's thread, not the reactor's;
#: the answers they hold wait with them.
BUSY_TIMEOUT = 20.0

#: The columns in L{StoredBinding}'s field order.
_COLUMNS = "aor, uri, params, host, port, listener, nat, expires_at, call_id, cseq, modified"

#: A row older than the stored one is left out (see the module docstring).
_UPSERT = f"""
INSERT INTO bindings ({_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (aor, uri) DO UPDATE SET
    params = excluded.params, host = excluded.host, port = excluded.port,
    listener = excluded.listener, nat = excluded.nat,
    expires_at = excluded.expires_at, call_id = excluded.call_id,
    cseq = excluded.cseq, modified = excluded.modified
WHERE excluded.modified >= bindings.modified
"""

_DELETE = "DELETE FROM bindings WHERE aor = ? AND uri = ? AND modified <= ?"


class StoreError(Exception):
    """
    The binding database cannot be used; the message names the file.
    """


#: A store row: L{StoredBinding}'s fields, in order.
Row = tuple[str, str, str, str, int, str, bool, float, str, int, float]

#: Buffered deletes: each key, with the C{modified} time of the copy that
#: deleted it (a newer row stays).
Deletes = dict[tuple[str, str], float]


class WriteBuffer:
    """
    The changes of a reactor turn, waiting for a commit: the latest put of
    each binding, and the deletions (L{Deletes}).  Every store keeps its writes here.

    A store that inherits it provides L{write}, the one step that touches
    the database; L{commit} takes the buffer and writes it, keeping it on
    failure.
    """

    def __init__(self) -> None:
        self._puts: dict[tuple[str, str], Binding] = {}
        self._deletes: Deletes = {}

    def put(self, binding: Binding) -> None:
        key = (binding.aor, binding.uri)
        self._deletes.pop(key, None)
        self._puts[key] = binding

    def delete(self, binding: Binding) -> None:
        key = (binding.aor, binding.uri)
        self._puts.pop(key, None)
        self._deletes[key] = binding.modified

    def pending(self) -> bool:
        return bool(self._puts or self._deletes)

    def takeWrites(self) -> tuple[dict[tuple[str, str], Binding], Deletes]:
        """
        Hand over the buffered writes and start a new buffer.
        """
        puts, self._puts = self._puts, {}
        deletes, self._deletes = self._deletes, {}
        return puts, deletes

    def restoreWrites(self, puts: dict[tuple[str, str], Binding], deletes: Deletes) -> None:
        """
        Put back writes a failed commit took, under any made since.
        """
        for key in self._deletes:
            puts.pop(key, None)
        for key in self._puts:
            deletes.pop(key, None)
        puts.update(self._puts)
        self._puts = puts
        deletes.update(self._deletes)
        self._deletes = deletes

    def write(self, rows: Sequence[Row], deletes: Deletes) -> None:
        raise NotImplementedError()

    def commit(self) -> None:
        """
        Write the buffered changes in one transaction; when that fails they
        stay buffered for the next commit, and the error is raised.
        """
        puts, deletes = self.takeWrites()
        try:
            # Values are read now, so several changes in one turn cost one
            # row write.
            self.write([storedRow(b) for b in puts.values()], deletes)
        except BaseException:
            self.restoreWrites(puts, deletes)
            raise


@implementer(IBindingStore)
class SQLiteStore(WriteBuffer):
    """
    Bindings in an SQLite file.

    @ivar location: the database file.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.location = path
        self._open()

    def _open(self) -> None:
        path = self.location
        try:
            # The writer thread uses the connection, one call at a time.
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._db.execute("SELECT count(*) FROM bindings").fetchone()
            # A write now, so that a file natkeep may read but not write is
            # refused at start, not at the first REGISTER.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot use binding database {path}: {e}")
        identity = (0, 0)
        if path != ":memory:":
            try:
                info = os.stat(path)
                identity = (info.st_dev, info.st_ino)
            except OSError:
                pass
        self._identity = identity

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
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def load(self, now: float) -> Iterator[StoredBinding]:
        self._db.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,))
        cursor = self._db.execute(f"SELECT {_COLUMNS} FROM bindings ORDER BY rowid")
        make = StoredBinding._make
        for row in cursor:
            yield make(row)

    def write(self, rows: Sequence[Row], deletes: Deletes) -> None:
        """
        Delete C{deletes} and upsert C{rows} in one transaction, each only
        over an older row.  Safe to
        call from the store's writer thread, one call at a time.

        @raise StoreError: naming the file and SQLite's reason (a full disk,
            an I/O error, a lock held too long); nothing of it is written.
        """
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(_DELETE, [(aor, uri, m) for (aor, uri), m in deletes.items()])
            if rows:
                db.executemany(_UPSERT, rows)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            # SQLite may have rolled back already (a full disk does).
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise StoreError(f"cannot write binding database {self.location}: {e}") from e

    def verify(self) -> Optional[str]:
        """
        Whether the database file is still the one opened: L{None}, else
        what happened to it (deleted, or replaced by another file).
        """
        if self.location == ":memory:":
            return None
        try:
            info = os.stat(self.location)
        except FileNotFoundError:
            return "deleted"
        except OSError as e:
            return f"unreadable ({e})"
        if (info.st_dev, info.st_ino) != self._identity:
            return "replaced by another file"
        return None

    def reopen(self) -> None:
        """
        Open the database file afresh (creating it if it is gone), for a
        store whose file was deleted or replaced underneath it; the caller
        writes every binding again.

        @raise StoreError: when it cannot be opened.
        """
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        self._open()

    def count(self, now: float, natOnly: bool = False) -> int:
        query = "SELECT count(*) FROM bindings WHERE expires_at > ?"
        if natOnly:
            query += " AND nat = 1"
        return int(self._db.execute(query, (now,)).fetchone()[0])

    def reader(self) -> SQLiteReader:
        return SQLiteReader(self.location)

    def close(self) -> None:
        if self.pending():
            self.commit()
        self._db.close()


@implementer(IBindingReader)
class SQLiteReader:
    """
    A read-only connection of its own to an SQLite binding file.
    """

    def __init__(self, path: str) -> None:
        try:
            self._db = sqlite3.connect(path, timeout=1.0, isolation_level=None)
            self._db.execute("PRAGMA query_only = ON")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot read binding database {path}: {e}")

    def hosts(self, aor: str, now: float) -> list[str]:
        rows = self._db.execute(
            "SELECT host FROM bindings WHERE aor = ? AND expires_at > ?", (aor, now)
        ).fetchall()
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        self._db.close()


class ThreadedWriter:
    """
    Runs a store's L{IBindingStore.write} on one thread of its own, so that
    a slow or locked disk stalls commits, not the reactor.  One thread:
    commits run in the order given, never two at once.
    """

    def __init__(self, reactor: Any, store: IBindingStore) -> None:
        from twisted.python.threadpool import ThreadPool

        self.reactor = reactor
        self.store = store
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="natkeep-store")

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        if self.pool.started and not self.pool.joined:
            self.pool.stop()

    def __call__(self, rows: Sequence[tuple[Any, ...]], deletes: Deletes) -> "Deferred[None]":
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.pool, self.store.write, rows, deletes)
