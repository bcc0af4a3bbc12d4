"""The survey being written, as MiniCPM4-Survey addresses it: positions "title", "abstract", "introduction",
"section-N", "section-N/subsection-M" (one more level allowed) and "conclusion".

An update's content is text for that position, or, when planning, a dict: {"title", "plan", "content",
"subsections": [...]} for a section, or {"title", "sections": [...]} (or {"section-1": {...}, ...}) for the
whole outline at "outline"/"plan". A section can be created only right after the last one, so numbering has no
gaps. A bad position or shape raises UpdateError, whose message is shown to the model at the next step.
"""

from __future__ import annotations

import re

TOP = ("title", "abstract", "introduction", "conclusion")
WHOLE = ("outline", "plan", "survey")
MAX_DEPTH = 3  # section / subsection / subsubsection


class UpdateError(ValueError):
    pass


def new_survey() -> dict:
    return {"title": "", "abstract": "", "introduction": "", "sections": [], "conclusion": ""}


def _node(title: str = "") -> dict:
    return {"title": title, "plan": "", "content": "", "subsections": []}


def _path(position: str) -> list[int]:
    parts = position.strip().lower().split("/")
    out = []
    for part in parts:
        m = re.fullmatch(r"(?:sub)*sections?[-_ ]?(\d+)", part.replace("subsction", "subsection"))
        if not m or int(m.group(1)) < 1:
            raise UpdateError(f"unknown position {position!r}: use one of {', '.join(TOP)}, section-N, "
                              "section-N/subsection-M")
        out.append(int(m.group(1)))
    if len(out) > MAX_DEPTH:
        raise UpdateError(f"position {position!r} is nested deeper than {MAX_DEPTH} levels")
    return out


def _locate(survey: dict, path: list[int], position: str) -> dict:
    siblings, node = survey["sections"], None
    for depth, n in enumerate(path):
        if n == len(siblings) + 1:
            siblings.append(_node())
        elif n > len(siblings):
            label = "section" if depth == 0 else "subsection"
            raise UpdateError(f"cannot update {position!r}: only {len(siblings)} {label}(s) exist here; "
                              f"add {label}-{len(siblings) + 1} first")
        node = siblings[n - 1]
        siblings = node["subsections"]
    return node


def _fill(node: dict, content: dict, position: str) -> None:
    for key in ("title", "plan", "content"):
        if key in content:
            if not isinstance(content[key], str):
                raise UpdateError(f"{position}.{key} must be a string")
            node[key] = content[key].strip()
    subs = content.get("subsections")
    if subs is not None:
        if not isinstance(subs, list) or not all(isinstance(s, dict) for s in subs):
            raise UpdateError(f"{position}.subsections must be a list of objects")
        node["subsections"] = []
        for i, sub in enumerate(subs, 1):
            node["subsections"].append(_node())
            _fill(node["subsections"][-1], sub, f"{position}/subsection-{i}")


def apply_update(survey: dict, position, content) -> str:
    """Apply one answer to `survey` in place; returns the normalised position."""
    if not isinstance(position, str) or not position.strip():
        raise UpdateError(f"'update' must be a position string, got {position!r}")
    pos = position.strip().lower()
    if isinstance(content, str):
        content = content.strip()
    elif not isinstance(content, dict):
        raise UpdateError(f"'content' for {position!r} must be a string or an object, got {type(content).__name__}")
    if pos in TOP:
        if isinstance(content, dict):
            if pos != "title":
                raise UpdateError(f"'content' for {pos!r} must be text")
            return _whole(survey, content, pos)
        survey[pos] = content
        return pos
    if pos in WHOLE:
        if not isinstance(content, dict):
            raise UpdateError(f"'content' for {pos!r} must be an object with the section titles and plans")
        return _whole(survey, content, pos)
    node = _locate(survey, _path(pos), position)
    if isinstance(content, dict):
        _fill(node, content, pos)
    else:
        node["content"] = content
    return pos


def _whole(survey: dict, content: dict, pos: str) -> str:
    if isinstance(content.get("title"), str):
        survey["title"] = content["title"].strip()
    sections = content.get("sections")
    if sections is None:
        keyed = sorted((int(m.group(1)), v) for k, v in content.items()
                       if (m := re.fullmatch(r"section[-_ ]?(\d+)", str(k).lower())))
        sections = [v for _, v in keyed] or None
    if sections is None:
        if pos == "title" and "title" in content:
            return pos
        raise UpdateError(f"the outline for {pos!r} needs 'sections': a list of {{title, plan}} objects")
    if not isinstance(sections, list):
        raise UpdateError(f"{pos}.sections must be a list")
    survey["sections"] = []
    for i, sec in enumerate(sections, 1):
        survey["sections"].append(_node())
        if isinstance(sec, str):
            sec = {"title": sec}
        if not isinstance(sec, dict):
            raise UpdateError(f"{pos}.sections[{i - 1}] must be an object or a title")
        _fill(survey["sections"][-1], sec, f"section-{i}")
    return pos


def walk(survey: dict):
    """(position, number like "2.1", depth, node) for every section, in reading order."""
    def rec(nodes, prefix, numbers, depth):
        for i, node in enumerate(nodes, 1):
            pos = f"{prefix}/{'sub' * depth}section-{i}" if prefix else f"section-{i}"
            num = numbers + [i]
            yield pos, ".".join(map(str, num)), depth, node
            yield from rec(node["subsections"], pos, num, depth + 1)
    yield from rec(survey["sections"], "", [], 0)


def outline_view(survey: dict) -> str:
    """The survey as the model sees it: every position labelled, plans shown, text in full."""
    lines = [f"[title] {survey['title'] or '(empty)'}", f"[abstract] {survey['abstract'] or '(empty)'}",
             f"[introduction] {survey['introduction'] or '(empty)'}"]
    for pos, num, depth, node in walk(survey):
        lines.append(f"{'#' * (depth + 2)} [{pos}] {num} {node['title'] or '(untitled)'}")
        if node["plan"]:
            lines.append(f"(plan: {node['plan']})")
        lines.append(node["content"] or "(empty)")
    lines.append(f"[conclusion] {survey['conclusion'] or '(empty)'}")
    return "\n".join(lines)


def is_empty(survey: dict) -> bool:
    return not any(survey[k] for k in TOP) and not survey["sections"]


def text_blocks(survey: dict) -> list[tuple[str, str]]:
    """(position, text) of every written part, in reading order: what citations are checked in."""
    blocks = [(k, survey[k]) for k in ("abstract", "introduction") if survey[k]]
    blocks += [(pos, node["content"]) for pos, _, _, node in walk(survey) if node["content"]]
    return blocks + ([("conclusion", survey["conclusion"])] if survey["conclusion"] else [])


def to_markdown(survey: dict, topic: str) -> str:
    """Markdown of the survey body (citations as they stand in the text)."""
    out = [f"# {survey['title'] or topic}", ""]
    for key in ("abstract", "introduction"):
        if survey[key]:
            out += [f"## {key.capitalize()}", "", survey[key], ""]
    for _, num, depth, node in walk(survey):
        out += [f"{'#' * (depth + 2)} {num} {node['title'] or '(untitled)'}", ""]
        if node["content"]:
            out += [node["content"], ""]
    if survey["conclusion"]:
        out += ["## Conclusion", "", survey["conclusion"], ""]
    return "\n".join(out).rstrip() + "\n"
