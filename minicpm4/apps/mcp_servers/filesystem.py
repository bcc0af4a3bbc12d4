"""The sandboxed filesystem MCP server: files and folders under one root directory, never outside it.

    python -m minicpm4.apps.mcp_servers.filesystem [--root DIR]

Without --root the server works in a fresh temp dir that is removed when it exits. Paths are relative to the
root ("/a.txt" means ROOT/a.txt); one that resolves outside the root (through "..", or a symlink) is refused.
Writes go to a temp file that is renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from minicpm4.fileio import atomic_write_text

server = MCPServer("filesystem", log_level="WARNING")
DESTRUCTIVE = ToolAnnotations(destructive_hint=True)
MAX_READ = 100_000  # characters read_file returns at most; the agent has its own output limit on top
ROOT = Path(".")  # set by main()


def _resolve(path: str) -> Path:
    """The real path of `path` under ROOT, refused when it leaves the root."""
    target = (ROOT / path.lstrip("/")).resolve()
    if not target.is_relative_to(ROOT):
        raise ToolError(f"path {path!r} is outside the sandbox")
    return target


def _shown(p: Path) -> str:
    return "/" + p.relative_to(ROOT).as_posix() if p != ROOT else "/"


@server.tool()
def read_file(path: str) -> str:
    """Read a text file."""
    p = _resolve(path)
    if not p.is_file():
        raise ToolError(f"no such file: {path}")
    return p.read_text(encoding="utf-8", errors="replace")[:MAX_READ]


@server.tool(annotations=DESTRUCTIVE)
def write_file(path: str, content: str) -> str:
    """Write text to a file, replacing it if it exists (parent folders are created)."""
    p = _resolve(path)
    if p.is_dir():
        raise ToolError(f"{path} is a directory")
    atomic_write_text(p, content)
    return f"wrote {len(content)} characters to {_shown(p)}"


@server.tool()
def list_directory(path: str = "/") -> str:
    """List the entries of a folder, folders marked with a trailing slash."""
    p = _resolve(path)
    if not p.is_dir():
        raise ToolError(f"no such directory: {path}")
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in p.iterdir())
    return "\n".join(names) if names else "(empty)"


@server.tool()
def create_directory(path: str) -> str:
    """Create a folder (and its parents)."""
    p = _resolve(path)
    if p.is_file():
        raise ToolError(f"{path} is a file")
    p.mkdir(parents=True, exist_ok=True)
    return f"created {_shown(p)}"


@server.tool(annotations=DESTRUCTIVE)
def delete_file(path: str) -> str:
    """Delete a file."""
    p = _resolve(path)
    if not p.is_file():
        raise ToolError(f"no such file: {path}")
    p.unlink()
    return f"deleted {_shown(p)}"


@server.tool(annotations=DESTRUCTIVE)
def move_file(source: str, destination: str) -> str:
    """Move or rename a file or folder."""
    src, dst = _resolve(source), _resolve(destination)
    if not src.exists():
        raise ToolError(f"no such file or directory: {source}")
    if dst.exists():
        raise ToolError(f"destination exists: {destination}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dst)
    return f"moved {_shown(src)} to {_shown(dst)}"


@server.tool()
def search_files(pattern: str, path: str = "/") -> str:
    """Find files whose name matches a glob pattern (e.g. "*.txt") under a folder, recursively."""
    p = _resolve(path)
    if not p.is_dir():
        raise ToolError(f"no such directory: {path}")
    hits = sorted(_shown(f) for f in p.rglob(pattern) if f.resolve().is_relative_to(ROOT))
    return "\n".join(hits) if hits else "(no matches)"


@server.tool()
def get_file_info(path: str) -> dict:
    """Size in bytes, kind (file or directory) and modification time of a path."""
    p = _resolve(path)
    if not p.exists():
        raise ToolError(f"no such file or directory: {path}")
    st = p.stat()
    return {"path": _shown(p), "kind": "directory" if p.is_dir() else "file", "size": st.st_size,
            "modified": st.st_mtime}


def main(argv: list[str] | None = None) -> None:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="the sandbox folder (default: a fresh temp dir, removed on exit)")
    args = parser.parse_args(argv)
    if args.root:
        ROOT = Path(args.root).resolve()
        ROOT.mkdir(parents=True, exist_ok=True)
        server.run("stdio")
        return
    with tempfile.TemporaryDirectory(prefix="minicpm4-fs-") as tmp:
        ROOT = Path(tmp).resolve()
        server.run("stdio")


if __name__ == "__main__":
    main()
