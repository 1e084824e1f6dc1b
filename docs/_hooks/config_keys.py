"""mkdocs hook: the page of every config key (`reference/config.md`), generated at build time from
`s2d_jax/config_schema.py` itself: each key's default and rule from the schema, its description from the comments
beside or above it in the source. One source of truth: the page cannot drift from the schema."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

from mkdocs.structure.files import File

from s2d_jax import config_schema
from s2d_jax.config_rules import _

PAGE = "reference/config.md"


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=markdown()))
    return files


def markdown() -> str:
    notes = comments(Path(config_schema.__file__).read_text())
    out = ["# Config keys", "",
           "Every key of an experiment config, generated from `s2d_jax/config_schema.py` when the docs are built. "
           "A config file sets only what it changes; any key can be overridden on the command line "
           "(`--config.train.steps=100`; a tuple as `a,b,c`). Keys marked *free* may change on a kept workdir "
           "(they do not change results).", ""]
    from s2d_jax.workdir import FREE

    for section, keys in groups(config_schema.schema()):
        out += [f"## `{section}`" if section else "## Top level", ""]
        if notes.get(section):
            out += [notes[section], ""]
        out += ["| key | default | allowed | what it does |", "|---|---|---|---|"]
        for key, value in keys:
            default, allowed = (value.default, value.check(float("nan"))) if isinstance(value, _) else (value, "")
            free = any(key == f or key.startswith(f + ".") for f in FREE)
            note = notes.get(key, "").replace("|", "\\|") + (" *(free)*" if free else "")
            out.append(f"| `{key}` | `{default!r}` | {allowed.replace('|', chr(92) + '|')} | {note} |")
        out.append("")
    return "\n".join(out)


def groups(tree: dict):
    """(section, [(dotted key, schema entry)]) in schema order; top-level scalars first, under ""."""
    top = [(k, v) for k, v in tree.items() if not isinstance(v, dict)]
    yield "", top
    for name, sub in tree.items():
        if isinstance(sub, dict):
            yield name, list(_leaves(sub, name + "."))


def _leaves(tree: dict, prefix: str):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v


def comments(source: str) -> dict[str, str]:
    """Dotted key -> the comment on its line, after the comment lines just above it (a section's too)."""
    out, path, above, last_key, pending_key = {}, [], [], None, None
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for k, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if last_key and tok.start[0] == last_key[1]:  # on the key's own line
                out[last_key[0]] = " ".join(filter(None, [out.get(last_key[0], ""), text]))
            else:
                above.append(text)
        elif tok.type == tokenize.STRING and k + 1 < len(tokens) and tokens[k + 1].string == ":" and path:
            key = ".".join([*path[1:], eval(tok.string)])
            if above:
                out[key] = " ".join(above)
            above, last_key, pending_key = [], (key, tok.start[0]), key
        elif tok.string == "{":
            path.append(pending_key.rsplit(".", 1)[-1] if pending_key and path else "")
            pending_key = None
        elif tok.string == "}":
            path.pop()
        elif tok.type == tokenize.NAME:  # a value (`_(...)`, True): the key before it opens no section
            pending_key = None
    return out
