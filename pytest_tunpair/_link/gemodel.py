"""Burst loss: the Gilbert-Elliott two-state model of netem's ``gemodel``.

A link is either *good* or *bad*. Each packet is lost with the probability of the state the
link is in when the packet arrives (``loss_good`` or ``loss_bad``), and then the link moves
on: from good to bad with probability ``p``, from bad to good with probability ``r``. This
is netem's ``loss gemodel p r 1-h 1-k`` (net/sched/sch_netem.c, ``loss_gilb_ell``, which
also decides each loss with the state *before* that packet's transition), with
``loss_bad = 1-h`` and ``loss_good = 1-k``.

Over many packets the link is bad a fraction ``p / (p + r)`` of the time, so the loss rate
is ``p / (p + r) * loss_bad + r / (p + r) * loss_good``; with ``loss_bad=1`` and
``loss_good=0`` (the *simple Gilbert* model) every bad period is one burst of losses, its
length geometric with mean ``1 / r``.

``max_burst`` is not in netem: it caps a run of consecutive losses (whatever the states):
the packet that would make the run longer passes instead, and the run starts again. The
chain itself moves on as if the packet had been lost, so the cap changes which packets are
lost and nothing else.

Determinism: a :class:`GilbertElliottChain` owns one ``random.Random(seed)`` and draws
exactly two ``random()`` values per packet, always in this order: the loss decision, then
the transition. Packet *k*'s fate therefore depends only on the seed and *k*.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from .._errors import OptionError
from .._schema import Int, Invalid, Object, Probability, declared, option, validate

__all__ = ["GilbertElliott", "GilbertElliottChain", "LossModel"]

_SPLIT = re.compile(r"\s*[,\s]\s*")
_PROBABILITY = Probability()
_SOURCE = "GilbertElliott()"


def _required(kind: Probability, help: str) -> Any:
    """A declared field without a default (``option()`` always gives one)."""
    return field(metadata=option(None, kind, help, cli=False).metadata)


@dataclass(frozen=True)
class GilbertElliott:
    """Burst loss, for ``impair(loss=GilbertElliott(p=0.01, r=0.3))``.

    ``p`` is the probability of moving from the good to the bad state after a packet,
    ``r`` from bad back to good; ``loss_bad`` and ``loss_good`` are the loss probability
    in each state; ``max_burst`` (an int >= 1, or None) caps a run of consecutive losses.
    Probabilities are numbers in ``[0, 1]`` or percentage strings (``"1%"``). The loss
    decisions are seeded like every other impairment.
    """

    p: float = _required(_PROBABILITY, "probability of moving from good to bad after a packet")
    r: float = _required(_PROBABILITY, "probability of moving from bad back to good after a packet")
    loss_bad: float = option(1.0, _PROBABILITY, "loss probability in the bad state", cli=False)
    loss_good: float = option(0.0, _PROBABILITY, "loss probability in the good state", cli=False)
    max_burst: int | None = option(
        None,
        Int(1, optional=True, what="None, or an int >= 1 (the longest run of consecutive losses)"),
        "cap on a run of consecutive losses",
        cli=False,
    )

    def __post_init__(self) -> None:
        validate(self, source=_SOURCE)

    @classmethod
    def parse(cls, text: str, *, source: str = "--gemodel") -> GilbertElliott:
        """``"p,r[,loss_bad[,loss_good]]"``, as on the command line (``--gemodel 1%,30%``);
        the order is netem's ``gemodel p r 1-h 1-k``. A bad text raises
        :class:`~pytest_tunpair.OptionError` from ``source``."""
        parts = [part for part in _SPLIT.split(text.strip()) if part]
        if not 2 <= len(parts) <= 4:
            raise OptionError(
                "gemodel",
                text,
                source=source,
                reason="give p,r[,loss_bad[,loss_good]], e.g. '1%,30%' or '0.01,0.3'",
            )
        values: list[Any] = [_number_or_text(x) for x in parts]
        names = [f.name for f, _ in declared(cls)]
        try:
            return cls(**dict(zip(names, values, strict=False)))
        except OptionError as exc:
            raise exc.with_source(source) from None

    @property
    def bad_fraction(self) -> float:
        """The share of packets that find the link in the bad state, ``p / (p + r)``."""
        if self.p == 0.0:
            return 0.0
        return self.p / (self.p + self.r)

    @property
    def loss_rate(self) -> float:
        """The long-run loss rate the model gives without ``max_burst``."""
        bad = self.bad_fraction
        return bad * self.loss_bad + (1.0 - bad) * self.loss_good

    @property
    def mean_burst(self) -> float:
        """The mean length of a bad period, ``1 / r`` packets: the mean burst of losses when
        ``loss_bad=1`` and ``loss_good=0`` (and no ``max_burst``)."""
        return math.inf if self.r == 0.0 else 1.0 / self.r

    def describe(self) -> str:
        """``GilbertElliott(p=0.01, r=0.3)`` plus the fields that differ from their
        defaults: the call that makes this model again."""
        parts = [f"p={self.p:g}", f"r={self.r:g}"]
        if self.loss_bad != 1.0:
            parts.append(f"loss_bad={self.loss_bad:g}")
        if self.loss_good != 0.0:
            parts.append(f"loss_good={self.loss_good:g}")
        if self.max_burst is not None:
            parts.append(f"max_burst={self.max_burst}")
        return f"GilbertElliott({', '.join(parts)})"

    def chain(self, seed: int | str) -> GilbertElliottChain:
        """A fresh chain (starting in the good state) drawing from ``random.Random(seed)``."""
        return GilbertElliottChain(self, seed)


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


class LossModel(Object):
    """The schema kind of a loss model in ``impair(loss=...)``: shown as its ``describe()``."""

    def __init__(self) -> None:
        super().__init__(GilbertElliott)

    def format(self, value: Any) -> str:
        if isinstance(value, GilbertElliott):
            return value.describe()
        raise Invalid(f"use {self.allowed}")


class GilbertElliottChain:
    """The state of one direction's Gilbert-Elliott loss: call :meth:`lost` once per packet.

    Not thread-safe; the relay thread owns it.
    """

    __slots__ = ("_bad", "_model", "_rng", "_run")

    def __init__(self, model: GilbertElliott, seed: int | str) -> None:
        self._model = model
        self._rng = random.Random(seed)
        self._bad = False
        self._run = 0

    @property
    def bad(self) -> bool:
        """True while the link is in the bad state."""
        return self._bad

    def lost(self) -> bool:
        """Decide the next packet's fate (True: lost) and move the chain on."""
        model = self._model
        u_loss = self._rng.random()
        u_move = self._rng.random()
        lost = u_loss < (model.loss_bad if self._bad else model.loss_good)
        if self._bad:
            self._bad = not u_move < model.r
        else:
            self._bad = u_move < model.p
        if not lost:
            self._run = 0
            return False
        if model.max_burst is not None and self._run >= model.max_burst:
            self._run = 0
            return False
        self._run += 1
        return True
