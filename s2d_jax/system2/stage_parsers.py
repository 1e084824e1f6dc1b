"""Parsers of intermediate program stages (BSM's plan and per-criterion scores), for real model text: numbered or
bulleted lists with preambles, markdown emphasis, sub-points and closing remarks."""

from __future__ import annotations

import re

_MARKER = re.compile(r"^(\s*)(?:\d+\s*[.):]|[-*•]|\(\w\)|[a-z][.)]|#+)\s+(.*)$")
_HEADED = re.compile(r"^(\s*)\*\*([^*]+?)\*\*\s*(.*)$")  # "**Relevance**: ..." without a list marker
_NOT_ITEMS = re.compile(r"^(evaluation plan|criteria|plan|here|the following|to evaluate|in order to|sure|"
                        r"certainly|overall|in conclusion|in summary|by (considering|following|evaluating)|these)\b",
                        re.IGNORECASE)


def _clean(text: str) -> str:
    text = re.sub(r"\*\*|__|`", "", text).strip()
    text = re.sub(r"^(criterion|criteria|factor)\s*\d*\s*[:.-]\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*:\s*", ": ", text, count=1) if ":" in text else text
    return text.strip(" :-").strip()


def plan_items(text: str, limit: int = 5) -> list[str]:
    """The criteria of an evaluation plan, at most `limit`, each as its name and description ("Accuracy: whether
    the facts are right"). List lines count; a preamble ("Here is an evaluation plan:"), a heading, a closing
    remark and empty lines do not; an indented sub-point joins the item above it; a description on the line after a
    bare criterion name joins it. Without any list only "Name: description" lines count. A plan with no criteria
    gives one, "Overall quality", so the program still judges."""
    lines = [line.rstrip() for line in text.splitlines()]
    listed = [(i, m) for i, line in enumerate(lines) if (m := _MARKER.match(line) or _HEADED.match(line))]
    items: list[str] = []
    if listed:
        top = min(len(m.group(1).expandtabs()) for _, m in listed)
        marked = {j for j, _ in listed}
        for i, m in listed:
            body = m.group(2) + (" " + m.group(3) if m.re is _HEADED and m.group(3) else "")
            nested = len(m.group(1).expandtabs()) > top
            if nested and items:
                items[-1] = f"{items[-1]} {_clean(body)}".strip()
            elif not _NOT_ITEMS.match(_clean(body)) or ":" in body:
                items.append(_clean(body))
            # a bare name ("1. Accuracy") followed by its description on the next, unmarked line
            if i + 1 < len(lines) and lines[i + 1].strip() and (i + 1) not in marked and items:
                follow = lines[i + 1].strip()
                if not _NOT_ITEMS.match(follow) and not items[-1].endswith((".", ")")) and ":" not in items[-1]:
                    items[-1] = f"{items[-1]}: {_clean(follow)}"
    else:  # no list: only "Name: description" lines are criteria; prose is no plan
        items = [_clean(line) for line in lines if re.match(r"^\s*[A-Z][\w /&-]{1,40}:\s*\S", line)
                 and not _NOT_ITEMS.match(line.strip())]
    seen, out = set(), []
    for item in items:
        key = item.split(":")[0].lower().strip()
        if item and key not in seen:
            seen.add(key)
            out.append(item)
    return out[:limit] or ["Overall quality"]


_SCORE = r"(\d+(?:\.\d+)?)\s*(?:/\s*10|out of 10)?"


def criterion_scores(text: str) -> list[float] | None:
    """[score of A, score of B] from a solve stage ("Assistant A: 8/10", "Score for Assistant B: 6", "A: 7, B: 5"),
    or None where the text does not give both."""
    found = {}
    for who in ("A", "B"):
        patterns = [rf"(?:assistant|response)\s*{who}(?:'s)?(?:\s+response)?\s*(?:score)?\s*[:=\-]\s*\**\s*{_SCORE}",
                    rf"score\s+(?:for|of)\s+(?:assistant|response)\s*{who}(?:'s response)?\s*(?:is|:|=)\s*\**\s*{_SCORE}",
                    rf"(?:^|\n)\s*\**{who}\**\s*[:=]\s*\**\s*{_SCORE}",
                    rf"(?:assistant|response)\s*{who}\b[^\n.]{{0,40}}?\b(?:scores?|rated|gets|receives)\s*(?:a|an)?\s*{_SCORE}"]
        for pattern in patterns:
            m = re.search(pattern, text, re.IGNORECASE)
            if m:
                found[who] = float(m.group(1))
                break
    return [found["A"], found["B"]] if len(found) == 2 else None


PARSERS = {"plan": plan_items, "scores": criterion_scores}
