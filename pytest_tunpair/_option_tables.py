"""The docs' generated tables: options (``docs/options.md``) and link profiles
(``docs/profiles.md``), from their declarations (``_schema``, ``_link/profiles.py``).

``python -m pytest_tunpair._option_tables docs/options.md docs/profiles.md`` rewrites each
table between its ``<!-- name:start -->`` and ``<!-- name:end -->`` markers in place; tests
fail while a page and the declarations differ. It lives at the front of the package, not in ``_schema``:
it reads the records of the upper layers (``ImpairmentSpec`` is the link's), which the
schema, at the bottom, must not import.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._link import profiles
from ._link.impair import ImpairmentSpec
from ._options import PairOptions
from ._schema import declared, default_of

__all__ = ["main", "markdown_table", "replace_table", "rewrite", "tables"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(cls: type) -> str:
    """The docs' table of ``cls``'s options: name, values, default, command line, meaning."""
    rows = [
        "| Option | Values | Default | `tunpair run` | Meaning |",
        "|---|---|---|---|---|",
    ]
    for f, decl in declared(cls):
        default = decl.default_doc or decl.kind.format(default_of(f))
        flags = ""
        if decl.cli:
            flags = f"`{decl.flag(f.name, default_of(f))}`"
            if decl.none_flag:
                flags += f", `{decl.none_flag}`"
        rows.append(
            f"| `{f.name}` | {_cell(decl.kind.allowed)} | `{_cell(default)}` | {flags} "
            f"| {_cell(decl.help)} |"
        )
    return "\n".join(rows) + "\n"


def replace_table(text: str, marker: str, table: str) -> str:
    """``text`` with what lies between ``<!-- marker:start -->`` and ``:end -->`` replaced."""
    start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
    head, sep, rest = text.partition(start)
    if not sep or end not in rest:
        raise ValueError(f"no {start.strip()} ... {end} block")
    return head + start + table + end + rest.split(end, 1)[1]


def tables() -> dict[str, str]:
    """Every generated table of the docs, by marker name."""
    return {
        "pair-options": markdown_table(PairOptions),
        "impairments": markdown_table(ImpairmentSpec),
        "profiles": profiles.markdown_table(),
    }


def rewrite(text: str) -> str:
    """``text`` with every generated table it has markers for brought up to date."""
    for marker, table in tables().items():
        if f"<!-- {marker}:start -->" in text:
            text = replace_table(text, marker, table)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_tunpair._option_tables PAGE...``: rewrite the tables in place
    (``docs/options.md`` and ``docs/profiles.md`` when no page is given)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for path in args or ["docs/options.md", "docs/profiles.md"]:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(rewrite(text))
    return 0


if __name__ == "__main__":
    # Run as a script this file is ``__main__``, a second copy of the module: call the
    # package's own, the one the rest of the package imports.
    from pytest_tunpair._option_tables import main as _main

    raise SystemExit(_main())
