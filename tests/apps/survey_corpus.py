"""A small source folder for the survey tests: planted facts in a .txt, an .html (with navigation around a
`role="main"` body), a .pdf (written here byte by byte) and a .md, among distractor passages of real prose
(stdlib docstrings)."""

from pathlib import Path

ZORBLAX = ("The Zorblax protocol opens every session with a quaternary handshake: four messages, each signed "
           "with the previous one's nonce, so that a replayed message is rejected at once.")
GLIMMERFISH = ("Glimmerfish spawn only under violet moonlight, when the lagoon water cools below twelve degrees "
               "and the females release their eggs in glowing clusters.")
QUILLON = ("The Quillon reactor is cooled by a loop of liquid bismuth that carries heat to a steam generator "
           "without ever boiling at atmospheric pressure.")
MARMOT = ("Alpine marmots hibernate in family burrows for up to seven months and wake together every few weeks "
          "to warm their bodies before falling asleep again.")


def write_pdf(path: Path, text: str) -> None:
    """A one-page PDF whose page draws `text` in Helvetica (a valid xref table, so strict readers accept it)."""
    content = f"BT /F1 10 Tf 40 720 Td ({text}) Tj ET".encode("latin-1")
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(out)


def build_sources(root: Path) -> Path:
    import argparse
    import json
    import queue
    import textwrap
    import threading

    root.mkdir(parents=True, exist_ok=True)
    (root / "zorblax.txt").write_text(f"Zorblax networking\n\n{ZORBLAX}\n")
    (root / "fish.html").write_text(
        "<html><head><title>Lagoon fauna</title><style>p {color: red}</style></head><body>"
        "<div class='nav'><a href='/'>Home</a> | <a href='/x'>Navigation link text that is not content</a></div>"
        f"<div role='main'><h1>Lagoon fauna</h1><p>{GLIMMERFISH}</p><div><p>Nested block inside main.</p></div></div>"
        "<div class='footer'><p>Footer words that must not be read as content at all</p></div></body></html>")
    write_pdf(root / "reactor.pdf", QUILLON)
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "marmots.md").write_text(f"# Mountain mammals\n\n{MARMOT}\n")
    for mod in (argparse, json, queue, textwrap, threading):
        (root / f"{mod.__name__}.md").write_text(f"# {mod.__name__}\n\n{mod.__doc__}\n")
    (root / ".hidden.txt").write_text("hidden files are skipped " * 10)
    return root
