"""A Griffe extension for the API reference: the package's Sphinx conventions, for Markdown.

- Sphinx roles in docstrings (``:class:`Capture```, ``:meth:`close```), which mkdocstrings'
  Markdown rendering would show literally, become code spans.
- ``#:`` comments above an attribute (Sphinx's attribute-doc comments, used across the
  package) become the attribute's docstring when it has none.
- Parameters whose names start with ``_`` (the package's own plumbing, e.g. ``TunPair``'s
  ``_keeper``) are left out of signatures, as private members are left out of the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj):`~?([^`]+)`")


def _doc_comment(attr: griffe.Attribute) -> str | None:
    filepath = attr.filepath
    if attr.lineno is None or not isinstance(filepath, Path):
        return None
    lines = filepath.read_text(encoding="utf-8").splitlines()
    comment: list[str] = []
    i = attr.lineno - 2  # the line above the assignment
    while i >= 0 and lines[i].strip().startswith("#:"):
        comment.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(comment) or None


class SphinxRoles(griffe.Extension):
    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is None:
            text = _doc_comment(attr)
            if text:
                attr.docstring = griffe.Docstring(text, parent=attr)

    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        private = [p.name for p in func.parameters if p.name.startswith("_")]
        for name in private:
            del func.parameters[name]

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
