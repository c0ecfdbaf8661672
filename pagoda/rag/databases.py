"""Which vector database a URI names: the one place the CLI and the server choose a backend.

- None: Milvus Lite at `$PAGODA_HOME/vectors/milvus.db` (the default);
- `sqlite:///abs/path/kb.sqlite`, `sqlite:relative.sqlite`, or any path ending in `.sqlite` or
  `.sqlite3`: one SQLite file (`sqlite_store`), which several processes may share; a bare
  `sqlite:` is `$PAGODA_HOME/vectors/kb.sqlite`;
- anything else goes to Milvus: a `.db` path is Milvus Lite, `http(s)://host:19530` a server.
"""

from __future__ import annotations

from pagoda.paths import pagoda_home
from pagoda.rag.milvus_store import MilvusDatabase
from pagoda.rag.sqlite_store import SqliteDatabase
from pagoda.rag.store import VectorDatabase

SQLITE_SCHEME = "sqlite:"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3")


def default_sqlite_path() -> str:
    """The SQLite file a bare `sqlite:` names: `$PAGODA_HOME/vectors/kb.sqlite`."""
    return str(pagoda_home() / "vectors" / "kb.sqlite")


def sqlite_path(uri: str) -> str | None:
    """The file a SQLite URI or path names, or None when `uri` is not one."""
    if uri.startswith(SQLITE_SCHEME):
        # sqlite:///abs/path -> /abs/path (an empty authority); sqlite:rel/path stays relative
        path = uri.removeprefix(SQLITE_SCHEME).removeprefix("//")
        return path or default_sqlite_path()
    return uri if uri.endswith(SQLITE_SUFFIXES) else None


def open_database(uri: str | None, token: str = "") -> VectorDatabase:
    """The vector database `uri` names (see the module docstring); `token` is for Milvus servers."""
    path = None if uri is None else sqlite_path(uri)
    if path is not None:
        return SqliteDatabase(path)
    return MilvusDatabase(uri, token=token)
