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
import numbers
import random
import re
from dataclasses import dataclass

from ._impair import _format_percent, _probability

__all__ = ["GilbertElliott", "GilbertElliottChain"]

_SPLIT = re.compile(r"\s*[,\s]\s*")


@dataclass(frozen=True)
class GilbertElliott:
    """Burst loss, for ``impair(loss=GilbertElliott(p=0.01, r=0.3))``.

    ``p`` is the probability of moving from the good to the bad state after a packet,
    ``r`` from bad back to good; ``loss_bad`` and ``loss_good`` are the loss probability
    in each state; ``max_burst`` (an int >= 1, or None) caps a run of consecutive losses.
    Probabilities are numbers in ``[0, 1]`` or percentage strings (``"1%"``). The loss
    decisions are seeded like every other impairment.
    """

    p: float
    r: float
    loss_bad: float = 1.0
    loss_good: float = 0.0
    max_burst: int | None = None

    def __post_init__(self) -> None:
        for name in ("p", "r", "loss_bad", "loss_good"):
            value = _probability(f"GilbertElliott.{name}", getattr(self, name))
            object.__setattr__(self, name, value)
        burst = self.max_burst
        if burst is not None and (
            isinstance(burst, bool) or not isinstance(burst, numbers.Integral) or burst < 1
        ):
            raise ValueError(
                f"GilbertElliott(max_burst={burst!r}): max_burst is an int >= 1 "
                "(the longest run of consecutive losses), or None for no cap"
            )
        if burst is not None:
            object.__setattr__(self, "max_burst", int(burst))

    @classmethod
    def parse(cls, text: str) -> GilbertElliott:
        """``"p,r[,loss_bad[,loss_good]]"``, as on the command line (``--gemodel 1%,30%``);
        the order is netem's ``gemodel p r 1-h 1-k``."""
        parts = [part for part in _SPLIT.split(text.strip()) if part]
        if not 2 <= len(parts) <= 4:
            raise ValueError(
                f"gemodel {text!r}: give p,r[,loss_bad[,loss_good]], e.g. '1%,30%' or '0.01,0.3'"
            )
        values: list[float | str] = [float(x) if _is_float(x) else x for x in parts]
        return cls(*values)  # type: ignore[arg-type]

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
        """``gemodel(p=1% r=30%)`` plus the non-default fields, for failure reports."""
        parts = [f"p={_format_percent(self.p)}", f"r={_format_percent(self.r)}"]
        if self.loss_bad != 1.0:
            parts.append(f"loss_bad={_format_percent(self.loss_bad)}")
        if self.loss_good != 0.0:
            parts.append(f"loss_good={_format_percent(self.loss_good)}")
        if self.max_burst is not None:
            parts.append(f"max_burst={self.max_burst}")
        return f"gemodel({' '.join(parts)})"

    def chain(self, seed: int | str) -> GilbertElliottChain:
        """A fresh chain (starting in the good state) drawing from ``random.Random(seed)``."""
        return GilbertElliottChain(self, seed)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
