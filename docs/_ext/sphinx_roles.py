"""A Griffe extension for the API reference: Sphinx roles in docstrings as Markdown code.

The package's docstrings cross-reference with Sphinx roles (``:class:`Capture```,
``:meth:`close```), which mkdocstrings' Markdown rendering would show literally.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
