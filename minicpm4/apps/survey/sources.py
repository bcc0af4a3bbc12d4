"""Source folders: text, Markdown, HTML and PDF files read as plain text and chunked into passages.

HTML is read with the standard library's parser; for Sphinx pages (Python's docs) only the main body
(`role="main"`) is kept, so navigation bars and sidebars do not become passages. PDF text comes from pypdf,
page by page. Passages are runs of whole paragraphs up to `words` words; a paragraph longer than that is cut
into windows that overlap by `overlap` words, so a sentence cut at a window edge is whole in one of them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path

from minicpm4.errors import InputError

SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "text",
            ".html": "html", ".htm": "html", ".pdf": "pdf"}


@dataclass
class Document:
    source: str  # path relative to the source folder
    title: str
    text: str


@dataclass
class Passage:
    id: int  # row in the index
    source: str
    title: str
    text: str

    def as_dict(self) -> dict:
        return asdict(self)


class _HTMLText(HTMLParser):
    """Text of an HTML page: block elements end lines, script/style/nav are dropped, and when the page has a
    `role="main"` element (Sphinx) only its text is kept."""

    BLOCKS = {"p", "div", "section", "li", "dt", "dd", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br",
              "table", "ul", "ol", "dl", "blockquote"}
    SKIP = {"script", "style", "nav", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.all, self.main, self.title = [], [], ""
        self.skip = 0
        self.main_depth = 0  # >0 while inside the role="main" element (counts nested tags of its kind)
        self.main_tag = None
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skip += 1
        if self.main_tag is None and dict(attrs).get("role") == "main":
            self.main_tag, self.main_depth = tag, 1
        elif tag == self.main_tag and self.main_depth:
            self.main_depth += 1
        if tag in self.BLOCKS:
            self._emit("\n\n" if tag in ("p", "pre", "section") or tag[0] == "h" else "\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == self.main_tag and self.main_depth:
            self.main_depth -= 1
        if tag in self.BLOCKS:
            self._emit("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skip:
            self._emit(data)

    def _emit(self, text):
        self.all.append(text)
        if self.main_depth:
            self.main.append(text)

    def text(self) -> str:
        return "".join(self.main if self.main_tag else self.all)


def _clean(text: str) -> str:
    text = text.replace("\u00b6", "")  # Sphinx permalink pilcrows
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_document(path: Path, root: Path) -> Document:
    kind = SUFFIXES[path.suffix.lower()]
    rel = path.relative_to(root).as_posix()
    if kind == "pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
        try:
            reader = PdfReader(path)
            text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
            title = (reader.metadata.title if reader.metadata else None) or path.stem
        except (PdfReadError, ValueError, KeyError, OSError) as e:
            raise InputError(f"{path}: not a readable PDF ({e})") from None
        return Document(rel, str(title), _clean(text))
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if kind == "html":
        parser = _HTMLText()
        parser.feed(raw)
        parser.close()
        # Sphinx titles end in " — <project> <version> documentation": the same on every page, so only noise
        title = re.sub(r"\s+\u2014\s+[^\u2014]*\bdocumentation$", "", _clean(parser.title))
        return Document(rel, title or path.stem, _clean(parser.text()))
    heading = re.search(r"^#\s+(.+)$", raw, re.M) if kind == "markdown" else None
    return Document(rel, heading.group(1).strip() if heading else path.stem, _clean(raw))


def list_sources(root: Path) -> list[Path]:
    """The readable files under `root`, sorted (so passage ids are the same on every machine)."""
    if not root.is_dir():
        raise InputError(f"--sources {root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise InputError(f"--sources {root}: no {'/'.join(sorted(set(SUFFIXES.values())))} files "
                         f"({', '.join(sorted(SUFFIXES))})")
    return files


def chunk(text: str, words: int = 160, overlap: int = 32) -> list[str]:
    """Whole paragraphs packed up to `words` words; longer paragraphs as overlapping windows."""
    if not 0 <= overlap < words:
        raise InputError(f"chunk overlap ({overlap}) must be >= 0 and below the chunk size ({words} words)")
    pieces: list[list[str]] = []
    for para in re.split(r"\n\s*\n", text):
        toks = para.split()
        if len(toks) <= words:
            pieces.append(toks)
        else:
            pieces += [toks[i:i + words] for i in range(0, len(toks) - overlap, words - overlap)]
    out, cur = [], []
    for toks in pieces:
        if cur and len(cur) + len(toks) > words:
            out.append(" ".join(cur))
            cur = []
        cur = cur + toks
    if cur:
        out.append(" ".join(cur))
    return [p for p in out if len(p.split()) >= 5]  # headings or link crumbs alone are no evidence


def passages(root: Path, words: int = 160, overlap: int = 32, files: list[Path] | None = None) -> list[Passage]:
    out = []
    for path in files if files is not None else list_sources(root):
        doc = read_document(path, root)
        for text in chunk(doc.text, words, overlap):
            out.append(Passage(len(out), doc.source, doc.title, text))
    if not out:
        raise InputError(f"--sources {root}: the files hold no text passages of 5 words or more")
    return out
