"""
Tests for the binding stores: one contract every store must keep (memory,
SQLite, and any later backend), then what is SQLite's own (schema steps,
files), and restoring bindings at start.
"""

from __future__ import annotations

import sqlite3
from typing import Callable

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from natkeep.bindings import Binding, BindingTable
from natkeep.counts import Counts
from natkeep.interfaces import IBindingReader, IBindingStore
from natkeep.outbox import Outbox
from natkeep.store import MIGRATIONS, SCHEMA_VERSION, SQLiteStore, StoreError
from natkeep.stores import storedCount
from natkeep.tap import BindingsService
from natkeep.testing import FakeListener, MemoryStore

from .postgres import freshDatabase, postgresUnavailable


def binding(n: int, expiresAt: float = 500.0, nat: bool = True, listener: object = None) -> Binding:
    return Binding(
        f"sip:{n}@example.com",
        f"sip:{n}@10.0.0.{n % 250}:5060",
        ';+sip.instance="<x>"',
        ("198.51.100.7", 20000 + n),
        listener or FakeListener(),
        nat,
        expiresAt,
        f"call-{n}",
        n + 1,
    )


def hideTableOnce(store: IBindingStore, execute: Callable[[str], object], table: str) -> None:
    """
    Make C{store}'s next commit fail by renaming its C{table} away
    (C{execute} runs a statement on its database), and bring the table
    back when that commit ends.
    """
    execute(f"ALTER TABLE {table} RENAME TO hidden")
    original = store.commit

    def commitOnce() -> None:
        store.commit = original  # type: ignore[method-assign]
        try:
            original()
        finally:
            execute(f"ALTER TABLE hidden RENAME TO {table}")

    store.commit = commitOnce  # type: ignore[method-assign]


class StoreContractMixin:
    """
    What every L{IBindingStore} does.  A test case mixes this in and says
    how to open its store (L{open}, again after L{reopen}) and how to make
    its next commit fail (L{breakNextCommit}).
    """

    store: IBindingStore

    #: What a commit broken by L{breakNextCommit} raises.
    commitError: type[Exception]

    def open(self) -> IBindingStore:
        raise NotImplementedError()

    def reopen(self) -> IBindingStore:
        """
        Close the store and open the same one again.
        """
        raise NotImplementedError()

    def breakNextCommit(self) -> None:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.store = self.open()
        self.addCleanup(lambda: self.store.close())  # type: ignore[attr-defined]

    def test_provides(self) -> None:
        """
        The store provides L{IBindingStore}.
        """
        self.assertTrue(verifyObject(IBindingStore, self.store))  # type: ignore[attr-defined]

    def test_reader(self) -> None:
        """
        The store's reader, on its own connection, sees what is committed
        and alive: the source hosts of an AOR's bindings, none of an
        expired one or of another AOR, and not what waits for a commit.
        """
        self.store.put(binding(1))
        self.store.put(binding(2, expiresAt=50.0))
        self.store.commit()
        self.store.put(binding(3))
        reader = self.store.reader()
        self.addCleanup(reader.close)  # type: ignore[attr-defined]
        self.assertTrue(verifyObject(IBindingReader, reader))  # type: ignore[attr-defined]
        self.assertEqual(reader.hosts("sip:1@example.com", 100.0), ["198.51.100.7"])  # type: ignore[attr-defined]
        self.assertEqual(reader.hosts("sip:2@example.com", 100.0), [])  # type: ignore[attr-defined]
        self.assertEqual(reader.hosts("sip:3@example.com", 100.0), [])  # type: ignore[attr-defined]
        self.store.commit()
        self.assertEqual(reader.hosts("sip:3@example.com", 100.0), ["198.51.100.7"])  # type: ignore[attr-defined]

    def test_roundTrip(self) -> None:
        """
        A committed binding comes back whole: NAT flag, source, listening
        address, Call-ID and CSeq included, and restores onto a listener.
        """
        b = binding(1)
        self.store.put(b)
        self.assertTrue(self.store.pending())
        self.store.commit()
        self.assertFalse(self.store.pending())
        [row] = list(self.reopen().load(100.0))
        self.assertEqual(  # type: ignore[attr-defined]
            (
                row.aor,
                row.uri,
                row.params,
                row.source,
                row.listener,
                row.nat,
                row.expiresAt,
                row.callId,
                row.cseq,
            ),
            (b.aor, b.uri, b.params, b.source, "127.0.0.1:5060", True, 500.0, "call-1", 2),
        )
        listener = FakeListener()
        again = row.restore(listener)
        self.assertEqual(  # type: ignore[attr-defined]
            (again.source, again.listener, again.nat, again.expiresAt),
            (b.source, listener, True, 500.0),
        )

    def test_latestValues(self) -> None:
        """
        Several changes to a binding in one turn write its latest state.
        """
        b = binding(1)
        self.store.put(b)
        b.cseq = 9
        self.store.put(b)
        self.store.commit()
        [row] = list(self.reopen().load(0.0))
        self.assertEqual(row.cseq, 9)  # type: ignore[attr-defined]

    def test_delete(self) -> None:
        """
        A deleted binding's row goes; a put after a delete wins.
        """
        a, b = binding(1), binding(2)
        for x in (a, b):
            self.store.put(x)
        self.store.commit()
        self.store.delete(a)
        self.store.delete(b)
        self.store.put(b)
        self.store.commit()
        self.assertEqual([r.aor for r in self.reopen().load(0.0)], [b.aor])  # type: ignore[attr-defined]

    def test_olderCopyLeftOut(self) -> None:
        """
        A row replaces, and a delete removes, only a stored row no newer
        than its copy (L{Binding.modified}): the late commit of a worker or
        node a device has left changes nothing.  The same time replaces
        (a takeover writes what it restored), and the newer copy's own
        delete removes.
        """
        moved, left = binding(1), binding(1)
        moved.source, moved.modified = ("203.0.113.9", 40000), 200.0
        left.modified = 100.0
        self.store.put(moved)
        self.store.commit()
        self.store.put(left)
        self.store.commit()
        self.store.delete(left)
        self.store.commit()
        [row] = list(self.reopen().load(0.0))
        self.assertEqual(  # type: ignore[attr-defined]
            (row.source, row.modified), (("203.0.113.9", 40000), 200.0)
        )
        again = binding(1)
        again.modified, again.cseq = 200.0, 7
        self.store.put(again)
        self.store.commit()
        [row] = list(self.reopen().load(0.0))
        self.assertEqual((row.source, row.cseq), (again.source, 7))  # type: ignore[attr-defined]
        self.assertEqual(row.restore(FakeListener()).modified, 200.0)  # type: ignore[attr-defined]
        self.store.delete(again)
        self.store.commit()
        self.assertEqual(list(self.reopen().load(0.0)), [])  # type: ignore[attr-defined]

    def test_expiredDroppedOnLoad(self) -> None:
        """
        Loading drops rows that expired meanwhile, from the store too.
        """
        self.store.put(binding(1, expiresAt=50.0))
        self.store.put(binding(2, expiresAt=150.0))
        self.store.commit()
        self.assertEqual(  # type: ignore[attr-defined]
            [r.aor for r in self.store.load(100.0)], ["sip:2@example.com"]
        )
        self.assertEqual(self.store.count(0.0), 1)  # type: ignore[attr-defined]

    def test_count(self) -> None:
        """
        C{count} counts the committed bindings alive at the given time, or
        only those behind NAT.
        """
        self.store.put(binding(1, nat=True))
        self.store.put(binding(2, nat=False))
        self.store.put(binding(3, expiresAt=10.0))
        self.assertEqual(self.store.count(0.0), 0)  # type: ignore[attr-defined]
        self.store.commit()
        self.assertEqual(  # type: ignore[attr-defined]
            [self.store.count(0.0), self.store.count(100.0), self.store.count(100.0, True)],
            [3, 2, 1],
        )

    def test_order(self) -> None:
        """
        Bindings load in the order they were first stored.
        """
        for n in (5, 3, 9):
            self.store.put(binding(n))
            self.store.commit()
        self.store.put(binding(3))
        self.store.commit()
        self.assertEqual(  # type: ignore[attr-defined]
            [r.cseq for r in self.reopen().load(0.0)], [6, 4, 10]
        )

    def test_failedCommitKeepsWrites(self) -> None:
        """
        A commit that fails keeps its writes, and the next commit makes them
        durable.
        """
        self.store.put(binding(1))
        self.breakNextCommit()
        self.assertRaises(self.commitError, self.store.commit)  # type: ignore[attr-defined]
        self.assertTrue(self.store.pending())  # type: ignore[attr-defined]
        self.store.commit()
        self.assertEqual(  # type: ignore[attr-defined]
            [r.aor for r in self.reopen().load(0.0)], ["sip:1@example.com"]
        )

    def test_failedCommitThenDelete(self) -> None:
        """
        A binding deleted after the commit that held its put failed stays
        deleted; one put again after the failed commit's delete is stored.
        """
        a, b = binding(1), binding(2)
        self.store.put(b)
        self.store.commit()
        self.store.put(a)
        self.store.delete(b)
        self.breakNextCommit()
        self.assertRaises(self.commitError, self.store.commit)  # type: ignore[attr-defined]
        self.store.delete(a)
        self.store.put(b)
        self.store.commit()
        self.assertEqual(  # type: ignore[attr-defined]
            [r.aor for r in self.reopen().load(0.0)], [b.aor]
        )


class MemoryStoreTests(StoreContractMixin, SynchronousTestCase):
    """
    The contract, kept by L{MemoryStore}.
    """

    commitError = OSError

    def open(self) -> MemoryStore:
        return MemoryStore()

    def reopen(self) -> MemoryStore:
        assert isinstance(self.store, MemoryStore)
        self.store.close()
        self.store = MemoryStore(self.store.rows)
        return self.store

    def breakNextCommit(self) -> None:
        assert isinstance(self.store, MemoryStore)
        self.store.failures = 1


class SQLiteContractTests(StoreContractMixin, SynchronousTestCase):
    """
    The contract, kept by L{SQLiteStore}.
    """

    commitError = StoreError

    def open(self) -> SQLiteStore:
        self.path = self.mktemp()
        return SQLiteStore(self.path)

    def reopen(self) -> SQLiteStore:
        self.store.close()
        self.store = SQLiteStore(self.path)
        return self.store

    def breakNextCommit(self) -> None:
        assert isinstance(self.store, SQLiteStore)
        hideTableOnce(self.store, self.store._db.execute, "bindings")


class PostgreSQLContractTests(StoreContractMixin, SynchronousTestCase):
    """
    The contract, kept by L{PostgreSQLStore} on a real PostgreSQL server
    the suite starts.
    """

    commitError = StoreError

    def open(self) -> IBindingStore:
        reason = postgresUnavailable()
        if reason:
            raise SkipTest(reason)
        from natkeep.pgstore import PostgreSQLStore

        self.uri = freshDatabase()
        return PostgreSQLStore(self.uri)

    def reopen(self) -> IBindingStore:
        from natkeep.pgstore import PostgreSQLStore

        self.store.close()
        self.store = PostgreSQLStore(self.uri)
        return self.store

    def breakNextCommit(self) -> None:
        import psycopg

        def execute(statement: str) -> None:
            with psycopg.connect(self.uri, autocommit=True) as conn:
                conn.execute(statement)  # type: ignore[arg-type]

        hideTableOnce(self.store, execute, "natkeep_bindings")


class PostgreSQLStoreTests(SynchronousTestCase):
    """
    What is L{PostgreSQLStore}'s own: its schema, a broken connection, a
    server it cannot reach, and the password kept out of log lines.
    """

    def setUp(self) -> None:
        reason = postgresUnavailable()
        if reason:
            raise SkipTest(reason)
        self.uri = freshDatabase()

    def test_schemaVersion(self) -> None:
        """
        A new database is at the current version, recorded; opening it
        again changes nothing.
        """
        import psycopg

        from natkeep.pgstore import SCHEMA_VERSION, PostgreSQLStore

        PostgreSQLStore(self.uri).close()
        PostgreSQLStore(self.uri).close()
        with psycopg.connect(self.uri) as conn:
            rows = conn.execute("SELECT version FROM natkeep_schema").fetchall()
        self.assertEqual(rows, [(SCHEMA_VERSION,)])

    def test_upgradeFromVersion1(self) -> None:
        """
        A version 1 database, which kept no C{modified}, opens with its
        bindings intact at the current version, each counted as oldest.
        """
        import psycopg

        from natkeep.pgstore import MIGRATIONS, SCHEMA_VERSION, PostgreSQLStore

        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(MIGRATIONS[0])  # type: ignore[arg-type]
            conn.execute("CREATE TABLE natkeep_schema (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO natkeep_schema (version) VALUES (1)")
            conn.execute(
                "INSERT INTO natkeep_bindings (aor, uri, params, host, port, listener, nat,"
                " expires_at, call_id, cseq) VALUES ('sip:1@example.com', 'sip:1@h', '',"
                " '198.51.100.7', 1, '127.0.0.1:5060', true, 500.0, 'c', 1)"
            )
        store = PostgreSQLStore(self.uri)
        self.addCleanup(store.close)
        [row] = list(store.load(0.0))
        self.assertEqual((row.aor, row.cseq, row.modified), ("sip:1@example.com", 1, 0.0))
        with psycopg.connect(self.uri) as conn:
            rows = conn.execute("SELECT version FROM natkeep_schema").fetchall()
        self.assertEqual(rows, [(SCHEMA_VERSION,)])

    def test_reconnects(self) -> None:
        """
        When the server ends natkeep's connection, the next write fails and
        keeps its rows; the one after reconnects and writes them.
        """
        import psycopg

        from natkeep.pgstore import PostgreSQLStore

        store = PostgreSQLStore(self.uri)
        self.addCleanup(store.close)
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        store.put(binding(1))
        self.assertRaises(StoreError, store.commit)
        self.assertTrue(store.pending())
        store.commit()
        self.assertEqual(store.count(0.0), 1)

    def test_unreachable(self) -> None:
        """
        A server that is not there is one line naming the database, without
        its password.
        """
        from natkeep.pgstore import PostgreSQLStore

        uri = "postgresql://natkeep:s3cret@/nowhere?host=/nonexistent-socket-dir"
        with self.assertRaises(StoreError) as raised:
            PostgreSQLStore(uri)
        message = str(raised.exception)
        self.assertTrue(message.startswith("cannot use binding database postgresql://natkeep:***@"))
        self.assertNotIn("s3cret", message)
        self.assertEqual(len(message.splitlines()), 1)


class SQLiteStoreTests(SynchronousTestCase):
    """
    What is L{SQLiteStore}'s own: the file, its schema and its faults.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.store = SQLiteStore(self.path)
        self.addCleanup(lambda: self.store.close())

    def reopen(self) -> SQLiteStore:
        self.store.close()
        self.store = SQLiteStore(self.path)
        return self.store

    def test_location(self) -> None:
        """
        The store's location is its file.
        """
        self.assertEqual(self.store.location, self.path)

    def test_uncommittedLost(self) -> None:
        """
        What was not committed is not on disk.
        """
        self.store.put(binding(1))
        self.store._db.close()  # a crash: nothing more is written
        self.store = SQLiteStore(self.path)
        self.assertEqual(list(self.store.load(0.0)), [])

    def test_schemaVersion(self) -> None:
        """
        The schema version is recorded; a newer one is refused by name.
        """
        self.store.close()
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        error = self.assertRaises(StoreError, SQLiteStore, self.path)
        self.assertIn(self.path, str(error))
        self.assertIn("newer", str(error))
        self.store = SQLiteStore(self.mktemp())

    def indexes(self) -> list[str]:
        with sqlite3.connect(self.path) as db:
            return [
                name
                for (name,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'bindings'"
                    " AND name NOT LIKE 'sqlite_autoindex%'"
                )
            ]

    def oldFile(self, version: int, recorded: int) -> None:
        """
        Write, in place of the store's file, a file of schema C{version}
        (its first C{version} steps) holding one binding, with C{recorded}
        as its recorded version.
        """
        self.store.close()
        for suffix in ("", "-wal", "-shm"):
            if FilePath(self.path + suffix).exists():
                FilePath(self.path + suffix).remove()
        with sqlite3.connect(self.path) as db:
            for step in MIGRATIONS[:version]:
                db.executescript(step)
            db.execute(f"PRAGMA user_version={recorded}")
            db.execute(
                "INSERT INTO bindings VALUES "
                "('sip:1@example.com', 'sip:1@h', '', '198.51.100.7', 1, '127.0.0.1:5060',"
                " 1, 500.0, 'c', 1)"
            )
        db.close()

    def assertUpgraded(self) -> None:
        """
        The store's file, opened, holds the old file's binding, counted as
        oldest, at the current version without the expiry index; a write
        replaces the row.
        """
        store = self.reopen()
        [row] = list(store.load(0.0))
        self.assertEqual((row.aor, row.cseq, row.modified), ("sip:1@example.com", 1, 0.0))
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(self.indexes(), [])
        again = row.restore(FakeListener())
        again.cseq = 2
        store.put(again)
        store.commit()
        self.assertEqual([r.cseq for r in self.reopen().load(0.0)], [2])

    def test_stepOneCreates(self) -> None:
        """
        Step 0 to 1 makes the bindings table with its expiry index.
        """
        self.oldFile(1, 1)
        self.assertEqual(self.indexes(), ["bindings_expiry"])

    def test_upgradeFromVersion1(self) -> None:
        """
        A version 1 file, which indexed C{expires_at} and kept no
        C{modified}, opens with its bindings intact at the current version.
        """
        self.oldFile(1, 1)
        self.assertUpgraded()

    def test_upgradeFromVersion2(self) -> None:
        """
        A version 2 file, which kept no C{modified}, opens with its
        bindings intact at the current version.
        """
        self.oldFile(2, 2)
        self.assertUpgraded()

    def test_unversionedFileIsVersion1(self) -> None:
        """
        A file with the bindings table but no recorded version, written
        before versions were recorded, is upgraded as version 1.
        """
        self.oldFile(1, 0)
        self.assertUpgraded()

    def test_newFileAtCurrentVersion(self) -> None:
        """
        A new file goes through every step: the current version, no expiry
        index.
        """
        self.assertEqual(SCHEMA_VERSION, len(MIGRATIONS))
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(self.indexes(), [])

    def test_corrupt(self) -> None:
        """
        A file that is not a database is an error naming the file.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"\x00garbage" * 1000)
        error = self.assertRaises(StoreError, SQLiteStore, path.path)
        self.assertEqual(
            str(error), f"cannot use binding database {path.path}: file is not a database"
        )

    def test_unwritable(self) -> None:
        """
        A path in a missing folder is an error naming the file.
        """
        error = self.assertRaises(StoreError, SQLiteStore, "/nonexistent/dir/natkeep.sqlite")
        self.assertIn("/nonexistent/dir/natkeep.sqlite", str(error))

    def test_noUnboundedGrowth(self) -> None:
        """
        Churn (register, unregister, expire) does not grow the file: freed
        pages are reused.
        """

        def churn(base: int) -> None:
            for n in range(base, base + 2000):
                self.store.put(binding(n))
            self.store.commit()
            for n in range(base, base + 2000):
                self.store.delete(binding(n))
            self.store.commit()

        churn(0)
        self.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = FilePath(self.path).getsize()
        for round in range(1, 11):
            churn(round * 2000)
        self.store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.assertEqual(self.store.count(0.0), 0)
        # Ten times the churn; growth would be tenfold, reuse keeps it flat
        # but for a little index fragmentation.
        self.assertLess(FilePath(self.path).getsize(), size * 1.25)

    def test_storedCount(self) -> None:
        """
        L{storedCount} counts live (NATed) rows without creating a file.
        """
        self.store.put(binding(1, nat=True))
        self.store.put(binding(2, nat=False))
        self.store.put(binding(3, expiresAt=10.0))
        self.store.commit()
        self.assertEqual(storedCount(self.path, 100.0, natOnly=False), 2)
        self.assertEqual(storedCount(self.path, 100.0, natOnly=True), 1)
        missing = self.mktemp()
        self.assertIsNone(storedCount(missing, 0.0, natOnly=True))
        self.assertFalse(FilePath(missing).exists())


class RestoreTests(SynchronousTestCase):
    """
    On start, stored bindings come back into the table.
    """

    def test_restore(self) -> None:
        """
        Unexpired bindings return with their flags on the listener of their
        address; bindings of an address no longer listened on are skipped
        and stay stored.
        """
        store = MemoryStore()
        here, gone = FakeListener("127.0.0.1:5060"), FakeListener("127.0.0.1:6000")
        kept, expired, orphan = (
            binding(1, listener=here),
            binding(2, 50.0, listener=here),
            binding(3, listener=gone),
        )
        for b in (kept, expired, orphan):
            store.put(b)
        store.commit()
        table = BindingTable(removed=store.delete)
        clock = Clock()
        clock.advance(100)
        service = BindingsService(
            store,
            table,
            {"127.0.0.1:5060": here},
            Outbox(clock, store, Counts()),
            clock,
        )
        service.startService()
        [restored] = table.lookup(kept.aor)
        self.assertIs(restored.listener, here)
        self.assertEqual(
            (restored.source, restored.nat, restored.expiresAt, restored.callId, restored.cseq),
            (kept.source, True, 500.0, "call-1", 2),
        )
        self.assertEqual(table.lookup(expired.aor), [])
        self.assertEqual(table.lookup(orphan.aor), [])
        self.assertIn((orphan.aor, orphan.uri), store.rows)
        self.assertFalse(store.pending())
