"""Options declared once: each one's type, default, check, command-line flag and help.

A dataclass field declared with :func:`option` carries a :class:`Declared` in its metadata.
Everything else is derived from it: validation (``validate`` in the record's
``__post_init__``), the ``tunpair run`` flags (``_cli.py``), the marker's help line
(``plugin.py``) and the option tables of ``docs/options.md`` (``_option_tables.py``, kept
in step by a test). Adding an option is adding one field.

A :class:`Kind` says how one kind of value is checked (``check``), read from the command
line (``from_text``) and shown (``format``): probability, duration, rate, int, choice,
bool, object, and the pair's own kinds (device names, address pairs) in ``_options.py``.
Kinds raise :class:`Invalid` with the reason; the record turns it into an ``OptionError``
naming the option, the value and where it came from.

No pytest, no heavy imports: the plugin imports this to write the marker's help.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from ._errors import OptionError

__all__ = [
    "Bool",
    "Choice",
    "Declared",
    "Duration",
    "Int",
    "Invalid",
    "Kind",
    "Object",
    "OneOf",
    "Probability",
    "Rate",
    "declared",
    "option",
    "validate",
]


class Invalid(Exception):
    """A kind refusing a value; ``reason`` says what to give instead (never shown alone)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Kind:
    """How one kind of value is checked, read from command-line text and shown."""

    #: What is allowed, as a noun phrase: "a probability, ...". Docs and messages use it.
    allowed = "a value"
    #: The command line's placeholder for the value.
    metavar = "X"

    def check(self, value: object) -> Any:
        """The normalised value, or :class:`Invalid`."""
        return value

    def from_text(self, text: str) -> Any:
        """What the command line's ``text`` stands for (``check`` still runs on it)."""
        return text

    def format(self, value: Any) -> str:
        """``value`` in a form :meth:`check` accepts (reports, the docs' defaults)."""
        return repr(value)

    def refuse(self, reason: str | None = None) -> Invalid:
        return Invalid(reason or f"use {self.allowed}")


# A decimal number as people write it in config: "10", "1.5", ".5", "1e-3".
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
# Patterns as strings, compiled (and cached by ``re``) on first use: compiled at import they
# were half of what importing the plugin costs (67 of 134 M instructions, callgrind).
_PERCENT_RE = rf"\s*({_NUMBER})\s*%\s*"
_DURATION_RE = rf"\s*({_NUMBER})\s*(s|ms|us)\s*"
_BARE_NUMBER_RE = rf"\s*[-+]?{_NUMBER}\s*"
# tc(8) rate units: "bit" is bits/s and "bps" is *bytes*/s; k/m/g/t are powers of 1000 and
# ki/mi/gi/ti powers of 1024.  Matched case-insensitively, like tc.
_RATE_RE = rf"(?i)\s*({_NUMBER})\s*([kmgt]i?)?(bit|bps)\s*"
_DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_RATE_PREFIXES = {
    "": 1.0,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 2.0**10,
    "mi": 2.0**20,
    "gi": 2.0**30,
    "ti": 2.0**40,
}
_RATE_SUFFIXES = {"bit": 1.0, "bps": 8.0}


def _real(kind: Kind, value: object) -> float:
    # bool is an int subclass, but impair(loss=True) is a mistake, not "100%".
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise kind.refuse()
    number = float(value)
    if not math.isfinite(number):
        raise kind.refuse()
    return number


def _number_or_text(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


class Probability(Kind):
    """0.0 to 1.0, or a percentage string (``"10%"``)."""

    allowed = "a probability, between 0.0 and 1.0 (a number, or a string like '10%')"
    metavar = "P"

    def check(self, value: object) -> float:
        if isinstance(value, str):
            match = re.fullmatch(_PERCENT_RE, value)
            if match is None:
                raise self.refuse()
            p = float(match.group(1)) / 100.0
        else:
            p = _real(self, value)
        if not 0.0 <= p <= 1.0:
            raise self.refuse()
        return p

    def from_text(self, text: str) -> Any:
        return _number_or_text(text)

    def format(self, value: Any) -> str:
        return f"{value * 100:.6g}%"


class Duration(Kind):
    """Seconds >= 0 as a number, or a string with a unit (``"20ms"``)."""

    allowed = (
        "a duration >= 0: seconds as a number, or a string with unit s, ms or us"
        " (e.g. '20ms', '1.5s', '200us')"
    )
    metavar = "T"

    def check(self, value: object) -> float:
        if isinstance(value, str):
            match = re.fullmatch(_DURATION_RE, value)
            if match is None:
                raise self.refuse()
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        else:
            seconds = _real(self, value)
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise self.refuse()
        return seconds

    def from_text(self, text: str) -> Any:
        # On a command line "20" is ambiguous (ms? s?): the Python API's seconds-as-numbers
        # rule would silently make `--delay 20` twenty seconds.
        if re.fullmatch(_BARE_NUMBER_RE, text):
            raise Invalid("add a unit (20ms, 20s)")
        return text

    def format(self, value: Any) -> str:
        if value == 0:
            return "0"
        if value >= 1.0:
            return f"{value:.6g}s"
        if value >= 1e-3:
            return f"{value * 1e3:.6g}ms"
        return f"{value * 1e6:.6g}us"


class Rate(Kind):
    """Bits per second > 0, as a number or a tc(8) string; ``None`` for unlimited."""

    allowed = (
        "in bits per second, > 0: a number, or a string like '500kbit', '10mbit', '1gbit'"
        " (bits/s) or '100kbps' (bytes/s, as in tc); None for unlimited"
    )
    metavar = "R"

    def check(self, value: object) -> float | None:
        if value is None:
            return None
        if isinstance(value, str):
            match = re.fullmatch(_RATE_RE, value)
            if match is None:
                raise self.refuse()
            prefix = (match.group(2) or "").lower()
            suffix = match.group(3).lower()
            bits = float(match.group(1)) * _RATE_PREFIXES[prefix] * _RATE_SUFFIXES[suffix]
        else:
            bits = _real(self, value)
        # Infinity would mean "unlimited", which is spelled None; 0 would never deliver anything.
        if not (math.isfinite(bits) and bits > 0.0):
            raise self.refuse()
        return bits

    def from_text(self, text: str) -> Any:
        return _number_or_text(text)

    def format(self, value: Any) -> str:
        if value is None:
            return "None"
        for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
            if value >= scale:
                return f"{value / scale:.6g}{unit}"
        return f"{value:.6g}bit"


class Int(Kind):
    """A whole number in ``[lo, hi]`` (None: no bound that side); ``optional``: or None."""

    metavar = "N"

    def __init__(
        self,
        lo: int | None = 0,
        hi: int | None = None,
        *,
        optional: bool = False,
        what: str | None = None,
    ) -> None:
        self.lo = lo
        self.hi = hi
        self.optional = optional
        self.what = what  # overrides the generic phrase, e.g. "an int, or None to ..."

    @property
    def allowed(self) -> str:  # type: ignore[override]
        if self.what is not None:
            return self.what
        span = f"from {self.lo} to {self.hi}" if self.hi is not None else f">= {self.lo}"
        if self.lo is None:
            span = "" if self.hi is None else f"<= {self.hi}"
        return f"{'None or ' if self.optional else ''}a whole number {span}"

    def check(self, value: object) -> int | None:
        if value is None and self.optional:
            return None
        # Integral rather than int so a numpy integer from a parametrize grid is accepted too.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self.refuse()
        number = int(value)
        if (self.lo is not None and number < self.lo) or (self.hi is not None and number > self.hi):
            raise self.refuse()
        return number

    def from_text(self, text: str) -> Any:
        try:
            return int(text, 10)
        except ValueError:
            return text

    def format(self, value: Any) -> str:
        return str(value)


class Choice(Kind):
    """One of ``values``; ``reason`` (optional) explains them."""

    def __init__(self, values: tuple[str, ...], reason: str | None = None) -> None:
        self.values = values
        self.reason = reason

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(repr(v) for v in self.values)

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return "{" + ",".join(self.values) + "}"

    def check(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise self.refuse(self.reason)
        return value

    def format(self, value: Any) -> str:
        return repr(value)


class Bool(Kind):
    """True or False (never a number). On the command line a flag sets the non-default."""

    allowed = "True or False"

    def check(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.refuse()
        return value


class Object(Kind):
    """An instance of ``cls`` (e.g. a loss model); never on the command line."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"a {self.cls.__name__}"

    def check(self, value: object) -> Any:
        if not isinstance(value, self.cls):
            raise self.refuse()
        return value


class OneOf(Kind):
    """The first of ``kinds`` that accepts the value (``loss=0.1`` or a loss model)."""

    def __init__(self, kinds: tuple[Kind, ...]) -> None:
        self.kinds = kinds

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return "; or ".join(k.allowed for k in self.kinds)

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return self.kinds[0].metavar

    def check(self, value: object) -> Any:
        for kind in self.kinds:
            try:
                return kind.check(value)
            except Invalid:
                continue
        raise self.refuse()

    def from_text(self, text: str) -> Any:
        return self.kinds[0].from_text(text)

    def format(self, value: Any) -> str:
        for kind in self.kinds:
            try:
                kind.check(value)
            except Invalid:
                continue
            return kind.format(value)
        return repr(value)


@dataclass(frozen=True, repr=False, eq=False)  # fewer generated methods: cheaper import
class Declared:
    """One option's declaration (the metadata of its dataclass field)."""

    kind: Kind
    help: str
    cli: bool = True
    """Whether ``tunpair run``/``shell`` have a flag for it."""
    group: str = "pair"
    """Which group of the command line's help it appears in."""
    default_doc: str | None = None
    """How the default reads in the docs, when the field's default is not the whole story."""
    nargs: int | None = None
    """Command-line values the flag takes (``--ipv4 A B``); None: one."""
    none_flag: str | None = None
    """A flag meaning ``None`` (``--no-ipv4``), mutually exclusive with the option's own."""
    reason_names_option: bool = False
    """Messages read ``"<name> is <allowed>"`` (impairments) rather than ``"use <allowed>"``."""
    inert: bool = False
    """Changes nothing by itself (a seed): its value alone does not make a record active."""

    def flag(self, name: str, default: object) -> str:
        """The command-line flag: ``--max-packets``; a bool defaulting to True: ``--no-X``."""
        base = name.replace("_", "-")
        if isinstance(self.kind, Bool) and default is True:
            return f"--no-{base}"
        return f"--{base}"

    def reason(self, name: str, invalid: Invalid) -> str:
        if self.reason_names_option and invalid.reason == f"use {self.kind.allowed}":
            return f"{name} is {self.kind.allowed}"
        return invalid.reason


_KEY = "tunpair"


def option(
    default: Any,
    kind: Kind,
    help: str,
    **more: Any,
) -> Any:
    """A dataclass field declaring an option (``more``: the other :class:`Declared` fields)."""
    return field(default=default, metadata={_KEY: Declared(kind, help, **more)})


def declared(cls: type) -> Iterator[tuple[Field[Any], Declared]]:
    """The declared options of a dataclass, in declaration order."""
    for f in fields(cls):
        decl = f.metadata.get(_KEY)
        if isinstance(decl, Declared):
            yield f, decl


def default_of(f: Field[Any]) -> Any:
    return None if f.default is MISSING else f.default


def changed(record: object) -> Iterator[tuple[str, Declared, Any]]:
    """``(name, declaration, value)`` of each declared field that differs from its default."""
    for f, decl in declared(type(record)):
        value = getattr(record, f.name)
        if value != default_of(f):
            yield f.name, decl, value


def validate(record: object, *, source: str) -> None:
    """Check and normalise every declared field of a frozen dataclass, in place.

    Raises :class:`OptionError` for the first bad one.
    """
    for f, decl in declared(type(record)):
        value = getattr(record, f.name)
        try:
            normalised = decl.kind.check(value)
        except Invalid as exc:
            raise OptionError(
                f.name, value, source=source, reason=decl.reason(f.name, exc)
            ) from None
        object.__setattr__(record, f.name, normalised)


def unknown(name: str, value: object, allowed: Sequence[str], *, source: str) -> OptionError:
    return OptionError(
        name, value, source=source, reason=f"the options are: {', '.join(allowed)}", unknown=True
    )
