"""The notes MCP server: a small key-value store of text notes, kept in one JSON file.

    python -m minicpm4.apps.mcp_servers.notes [--path FILE]

Without --path the store lives in a fresh temp dir removed on exit. Every change rewrites the file atomically
(temp + rename), so a crash mid-write leaves the previous store intact.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from minicpm4.fileio import atomic_write_text

server = MCPServer("notes", log_level="WARNING")
DESTRUCTIVE = ToolAnnotations(destructive_hint=True)
STORE = Path("notes.json")  # set by main()


def _load() -> dict[str, str]:
    return json.loads(STORE.read_text(encoding="utf-8")) if STORE.is_file() else {}


def _save(notes: dict[str, str]) -> None:
    atomic_write_text(STORE, json.dumps(notes, ensure_ascii=False, indent=1, sort_keys=True))


@server.tool(annotations=DESTRUCTIVE)
def save_note(key: str, text: str) -> str:
    """Save a note under a key, replacing any note already there."""
    if not key:
        raise ToolError("key must be a non-empty string")
    notes = _load()
    notes[key] = text
    _save(notes)
    return f"saved note {key!r}"


@server.tool()
def get_note(key: str) -> str:
    """The text of the note saved under a key."""
    notes = _load()
    if key not in notes:
        raise ToolError(f"no note named {key!r}")
    return notes[key]


@server.tool()
def append_to_note(key: str, text: str) -> str:
    """Add a line to the end of a note (the note is created if it does not exist)."""
    notes = _load()
    notes[key] = f"{notes[key]}\n{text}" if notes.get(key) else text
    _save(notes)
    return f"appended to note {key!r}"


@server.tool()
def list_notes(prefix: str = "") -> str:
    """The keys of all notes, or of those whose key starts with a prefix."""
    keys = sorted(k for k in _load() if k.startswith(prefix))
    return "\n".join(keys) if keys else "(no notes)"


@server.tool()
def search_notes(query: str) -> str:
    """Keys of the notes whose text contains the query (case-insensitive)."""
    q = query.lower()
    keys = sorted(k for k, v in _load().items() if q in v.lower())
    return "\n".join(keys) if keys else "(no matches)"


@server.tool(annotations=DESTRUCTIVE)
def delete_note(key: str) -> str:
    """Delete the note saved under a key."""
    notes = _load()
    if key not in notes:
        raise ToolError(f"no note named {key!r}")
    del notes[key]
    _save(notes)
    return f"deleted note {key!r}"


def main(argv: list[str] | None = None) -> None:
    global STORE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="the JSON store (default: in a fresh temp dir, removed on exit)")
    args = parser.parse_args(argv)
    if args.path:
        STORE = Path(args.path).resolve()
        server.run("stdio")
        return
    with tempfile.TemporaryDirectory(prefix="minicpm4-notes-") as tmp:
        STORE = Path(tmp) / "notes.json"
        server.run("stdio")


if __name__ == "__main__":
    main()
