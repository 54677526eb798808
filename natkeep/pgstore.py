"""
Bindings in PostgreSQL, through psycopg 3: the store several natkeep nodes
can share (C{db = postgresql:///natkeep?host=/run/postgresql}).

Same contract as L{natkeep.store.SQLiteStore}: the writes of a reactor turn
go in one transaction (group commit, pipelined), the schema is upgraded by
explicit steps recorded in C{natkeep_schema}, and a restore reads the rows
in the order they were first stored.  A connection that broke is opened
again by the next write; the write that found it broken fails, and its rows
stay buffered for the one after.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Optional, Sequence

from zope.interface import implementer

from natkeep.bindings import StoredBinding
from natkeep.interfaces import IBindingReader, IBindingStore
from natkeep.store import Deletes, Row, StoreError, WriteBuffer

#: The steps that take a database from version N to N+1, at index N.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the bindings table; id keeps the order rows were first stored.
    """
    CREATE TABLE natkeep_bindings (
        id BIGSERIAL NOT NULL,
        aor TEXT NOT NULL,
        uri TEXT NOT NULL,
        params TEXT NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        listener TEXT NOT NULL,
        nat BOOLEAN NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        call_id TEXT NOT NULL,
        cseq BIGINT NOT NULL,
        PRIMARY KEY (aor, uri)
    );
    CREATE INDEX natkeep_bindings_listener ON natkeep_bindings (listener);
    """,
    # 1 -> 2: when the REGISTER behind each row arrived (see
    # L{natkeep.store}); rows from before count as oldest.
    """
    ALTER TABLE natkeep_bindings
        ADD COLUMN modified DOUBLE PRECISION NOT NULL DEFAULT 0;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = "aor, uri, params, host, port, listener, nat, expires_at, call_id, cseq, modified"

#: One statement for a whole commit's rows, one array per column: a commit
#: costs one round trip and one plan, however many rows it holds.  As in
#: SQLite, a row or a delete older than the stored row is left out.
_UPSERT = f"""
INSERT INTO natkeep_bindings ({_COLUMNS})
SELECT * FROM unnest(
    %s::text[], %s::text[], %s::text[], %s::text[], %s::integer[],
    %s::text[], %s::boolean[], %s::double precision[], %s::text[], %s::bigint[],
    %s::double precision[]
)
ON CONFLICT (aor, uri) DO UPDATE SET
    params = excluded.params, host = excluded.host, port = excluded.port,
    listener = excluded.listener, nat = excluded.nat,
    expires_at = excluded.expires_at, call_id = excluded.call_id,
    cseq = excluded.cseq, modified = excluded.modified
WHERE excluded.modified >= natkeep_bindings.modified
"""

_DELETE = """
DELETE FROM natkeep_bindings AS b
USING unnest(%s::text[], %s::text[], %s::double precision[]) AS d (aor, uri, modified)
WHERE b.aor = d.aor AND b.uri = d.uri AND b.modified <= d.modified
"""

#: Seconds a connection attempt may take.
CONNECT_TIMEOUT = 10


def isPostgreSQL(db: str) -> bool:
    """
    Whether the C{db} setting names a PostgreSQL database (a libpq URI).
    """
    return db.startswith(("postgresql://", "postgres://"))


def redacted(uri: str) -> str:
    """
    C{uri} without its password, for log lines.
    """
    uri = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", uri)
    return re.sub(r"(password=)[^&]*", r"\1***", uri)


@implementer(IBindingStore)
class PostgreSQLStore(WriteBuffer):
    """
    Bindings in a PostgreSQL table, C{natkeep_bindings}.

    @ivar location: the URI, without its password.
    """

    def __init__(self, uri: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                "db = postgresql://... needs psycopg 3: pip install 'natkeep[postgresql]'"
            )
        self._psycopg = psycopg
        self.uri = uri
        self.location = redacted(uri)
        self._conn: Any = None
        self._connect()
        try:
            self._migrate()
        except psycopg.Error as e:
            raise StoreError(f"cannot use binding database {self.location}: {_reason(e)}")

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            self._conn = psycopg.connect(self.uri, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as e:
            raise StoreError(f"cannot use binding database {self.location}: {_reason(e)}")
        return self._conn

    def _connection(self) -> Any:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            conn = self._connect()
        return conn

    def _migrate(self) -> None:
        conn = self._conn
        with conn.transaction():
            # One node migrates at a time.
            conn.execute("SELECT pg_advisory_xact_lock(7403001)")
            conn.execute("CREATE TABLE IF NOT EXISTS natkeep_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM natkeep_schema").fetchone()
            version = 0 if row is None else int(row[0])
            if row is None:
                conn.execute("INSERT INTO natkeep_schema (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"binding database {self.location} has schema version {version}, "
                    f"newer than this natkeep's {SCHEMA_VERSION}"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("UPDATE natkeep_schema SET version = %s", (step + 1,))

    def load(self, now: float) -> Iterator[StoredBinding]:
        conn = self._connection()
        with conn.transaction():
            conn.execute("DELETE FROM natkeep_bindings WHERE expires_at <= %s", (now,))
        make = StoredBinding._make
        with conn.transaction():
            with conn.cursor(name="natkeep_restore") as cursor:
                cursor.itersize = 10000
                cursor.execute(f"SELECT {_COLUMNS} FROM natkeep_bindings ORDER BY id")
                for row in cursor:
                    yield make(row)

    def write(self, rows: Sequence[Row], deletes: Deletes) -> None:
        """
        Delete C{deletes} and upsert C{rows} in one transaction, pipelined,
        each only over an older row.
        Safe to call from the store's writer thread, one call at a time.

        @raise StoreError: naming the database and the reason; nothing of
            it is written.
        """
        psycopg = self._psycopg
        try:
            conn = self._connection()
            with conn.transaction():
                if deletes:
                    conn.execute(
                        _DELETE,
                        [
                            [aor for aor, _ in deletes],
                            [uri for _, uri in deletes],
                            list(deletes.values()),
                        ],
                    )
                if rows:
                    # The keys are unique: a commit's rows come from a dict.
                    conn.execute(_UPSERT, [list(column) for column in zip(*rows, strict=True)])
        except psycopg.Error as e:
            # The transaction block rolled back what it began.
            raise StoreError(f"cannot write binding database {self.location}: {_reason(e)}") from e

    def verify(self) -> Optional[str]:
        # A connection that broke is mended by the next write; the rows are
        # the server's, not gone.
        return None

    def reopen(self) -> None:
        self._connection()

    def count(self, now: float, natOnly: bool = False) -> int:
        conn = self._connection()
        query = "SELECT count(*) FROM natkeep_bindings WHERE expires_at > %s"
        if natOnly:
            query += " AND nat"
        row = conn.execute(query, (now,)).fetchone()
        return int(row[0])

    def reader(self) -> PostgreSQLReader:
        return PostgreSQLReader(self._psycopg, self.uri, self.location)

    def close(self) -> None:
        try:
            if self.pending():
                self.commit()
        finally:
            if self._conn is not None and not self._conn.closed:
                self._conn.close()


def _reason(error: Exception) -> str:
    """
    The first line of a driver error, for a one-line message.
    """
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@implementer(IBindingReader)
class PostgreSQLReader:
    """
    A connection of its own to the PostgreSQL binding database, for reads.
    """

    def __init__(self, psycopg: Any, uri: str, location: str) -> None:
        try:
            self._conn = psycopg.connect(uri, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as e:
            raise StoreError(f"cannot read binding database {location}: {_reason(e)}")

    def hosts(self, aor: str, now: float) -> list[str]:
        rows = self._conn.execute(
            "SELECT host FROM natkeep_bindings WHERE aor = %s AND expires_at > %s", (aor, now)
        ).fetchall()
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        self._conn.close()
