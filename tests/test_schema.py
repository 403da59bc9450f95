"""The option schema (pure logic, no tunnel): validation, kinds, the docs' tables, citations."""

from __future__ import annotations

import argparse
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_tunpair import OptionError, PairOptions
from pytest_tunpair._link.impair import ImpairmentSpec
from pytest_tunpair._option_tables import markdown_table, replace_table, rewrite
from pytest_tunpair._schema import (
    Bool,
    Choice,
    Duration,
    Int,
    Invalid,
    Object,
    OneOf,
    Probability,
    Rate,
    option,
    validate,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


# -- the records validate on construction ------------------------------------------------------
def test_pair_options_validate_on_construction_with_the_parts_of_the_error() -> None:
    with pytest.raises(OptionError) as info:
        PairOptions(mtu="big")  # type: ignore[arg-type]
    error = info.value
    assert (error.option, error.value, error.source) == ("mtu", "big", "PairOptions()")
    assert error.reason == "use a whole number from 68 to 65535"
    assert (
        str(error) == "PairOptions(): bad value for mtu='big': use a whole number from 68 to 65535"
    )
    assert isinstance(error, ValueError)


def test_from_kwargs_names_its_source_and_unknown_options() -> None:
    with pytest.raises(OptionError) as info:
        PairOptions.from_kwargs({"mtu": 1000}, source="@pytest.mark.tunpair")
    assert info.value.source == "@pytest.mark.tunpair" and "IPv6 needs" in info.value.reason
    with pytest.raises(OptionError, match="unknown option 'colour'; the options are: mode,"):
        PairOptions.from_kwargs({"colour": "red"}, source="x")
    assert PairOptions.from_kwargs({}, index=2).names == ("tun4", "tun5")


def test_option_error_survives_pickling() -> None:
    # xdist ships errors between processes.
    error = OptionError("mtu", "big", source="--mtu", reason="use a number")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.option, copy.value, copy.source, copy.reason) == (
        "mtu",
        "big",
        "--mtu",
        "use a number",
    )
    assert str(copy) == str(error)


def test_impairment_values_raise_option_errors() -> None:
    with pytest.raises(OptionError) as info:
        ImpairmentSpec(delay="soon")  # type: ignore[arg-type]
    assert (info.value.option, info.value.source) == ("delay", "impair()")
    assert info.value.reason.startswith("delay is a duration")


# -- kinds ---------------------------------------------------------------------------------------
def test_kinds_check_and_format() -> None:
    assert Probability().check("10%") == pytest.approx(0.1)
    assert Duration().check("20ms") == pytest.approx(0.02)
    assert Duration().format(0.02) == "20ms"
    assert Rate().check("1mbps") == 8e6 and Rate().format(8e6) == "8mbit"
    assert Int(1, 10).check(5) == 5
    assert Choice(("a", "b")).check("a") == "a"
    assert Bool().check(False) is False
    for kind, bad in [
        (Int(1, 10), 11),
        (Int(1, 10), True),
        (Choice(("a", "b")), "c"),
        (Bool(), 1),
        (Object(Path), "x"),
        (Probability(), 1.5),
    ]:
        with pytest.raises(Invalid):
            kind.check(bad)


def test_durations_on_the_command_line_need_a_unit() -> None:
    with pytest.raises(Invalid, match=r"add a unit \(20ms, 20s\)"):
        Duration().from_text("20")
    assert Duration().check(Duration().from_text("20ms")) == pytest.approx(0.02)


def test_one_of_takes_the_first_kind_that_fits() -> None:
    kind = OneOf((Probability(), Object(Path)))
    assert kind.check("50%") == 0.5
    assert kind.check(Path("/x")) == Path("/x")
    with pytest.raises(Invalid):
        kind.check("nope")


# -- a new option is one declaration ----------------------------------------------------------
@dataclass(frozen=True)
class _Demo:
    limit: int | None = option(
        None, Int(1, optional=True), "queue limit in packets", group="impair"
    )
    ecn: bool = option(False, Bool(), "mark instead of dropping", group="impair")
    queue: str = option("fifo", Choice(("fifo", "codel")), "queue discipline", group="impair")
    model: object = option(0.0, OneOf((Probability(), Object(Path))), "loss model", cli=False)

    def __post_init__(self) -> None:
        validate(self, source="impair()")


def test_a_declaration_gives_validation_flags_and_docs() -> None:
    from pytest_tunpair import _cli

    assert _Demo(limit=5, ecn=True, queue="codel").queue == "codel"
    with pytest.raises(OptionError, match=r"impair\(\): bad value for queue='red'"):
        _Demo(queue="red")
    parser = argparse.ArgumentParser()
    groups = {key: parser.add_argument_group(key) for key in _cli._GROUPS}
    _cli._add_options(groups, _Demo, "demo_")
    args = parser.parse_args(["--limit", "7", "--ecn", "--queue", "codel"])
    assert (args.demo_limit, args.demo_ecn, args.demo_queue) == ("7", True, "codel")
    assert "--model" not in parser.format_help()
    table = markdown_table(_Demo)
    assert "| `limit` |" in table and "`--ecn`" in table and "| `model` |" in table


# -- the docs follow the schema ------------------------------------------------------------------
def test_the_docs_option_tables_match_the_schema() -> None:
    text = (DOCS / "options.md").read_text(encoding="utf-8")
    assert "<!-- pair-options:start -->" in text and "<!-- impairments:start -->" in text
    expected = rewrite(text)
    assert text == expected, (
        "docs/options.md is out of date: run `python -m pytest_tunpair._option_tables docs/options.md`"
    )
    for name in [*PairOptions.names_allowed(), *ImpairmentSpec.names()]:
        assert f"| `{name}` |" in text


def test_the_table_generator_runs_as_documented(tmp_path: Path) -> None:
    copy = tmp_path / "options.md"
    original = (DOCS / "options.md").read_text(encoding="utf-8")
    copy.write_text(replace_table(original, "pair-options", "stale\n"), encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "pytest_tunpair._option_tables", str(copy)], check=True, cwd=ROOT
    )
    assert copy.read_text(encoding="utf-8") == original


def test_the_marker_help_names_every_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    line = next(ln for ln in result.stdout.lines if ln.startswith("@pytest.mark.tunpair("))
    for name in PairOptions.names_allowed():
        assert re.search(rf"\b{name}\b", line), (name, line)


# -- citations resolve, and no comment cites an issue ---------------------------------------
_CITATION = re.compile(r'docs/internals\.md,\s+"([^"]+)"')


def _sources() -> list[Path]:
    dirs = ("pytest_tunpair", "tests", "benchmarks", "examples")
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


def test_every_internals_citation_names_a_heading() -> None:
    headings = set(re.findall(r"^## (.+)$", (DOCS / "internals.md").read_text(), re.M))
    cited = 0
    for path in _sources():
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text(encoding="utf-8"))
        for heading in _CITATION.findall(text):
            cited += 1
            assert heading in headings, f"{path.name} cites a missing heading {heading!r}"
    assert cited >= 10


def test_no_comment_cites_kernel_notes_or_an_issue_number() -> None:
    bad = re.compile(r"kernel-notes|\b[Ii]ssues? #?\d+\b")
    for path in _sources():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if path.name == "test_schema.py" and "re.compile" in line:
                continue
            assert not bad.search(line), f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
