"""
Which store the C{db} setting names: an SQLite file, or PostgreSQL for a
libpq URI.  Beside both, so that neither store knows the other.
"""

from __future__ import annotations

import os
from typing import Optional

from natkeep.interfaces import IBindingStore
from natkeep.pgstore import PostgreSQLStore, isPostgreSQL
from natkeep.store import SQLiteStore


def openStore(db: str) -> IBindingStore:
    """
    The store the C{db} setting names: PostgreSQL for a libpq URI
    (C{postgresql://...}), else an SQLite file.

    @raise StoreError: naming the database and why it cannot be used.
    """
    if isPostgreSQL(db):
        return PostgreSQLStore(db)
    return SQLiteStore(db)


def storedCount(path: str, now: float, natOnly: bool) -> Optional[int]:
    """
    How many live bindings the database C{path} holds, without creating an
    SQLite file; L{None} when there is no such file.

    @raise StoreError: when it cannot be read.
    """
    if not isPostgreSQL(path) and not os.path.exists(path):
        return None
    store = openStore(path)
    try:
        return store.count(now, natOnly)
    finally:
        store.close()
