"""Unit tests of the Gilbert-Elliott burst-loss model (pure logic)."""

from __future__ import annotations

import pytest

from pytest_tunpair import GilbertElliott, OptionError

N = 200_000


def losses(model: GilbertElliott, seed: int = 1, n: int = N) -> list[bool]:
    chain = model.chain(seed)
    return [chain.lost() for _ in range(n)]


def bursts(lost: list[bool]) -> list[int]:
    runs, run = [], 0
    for x in lost:
        if x:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    if run:
        runs.append(run)
    return runs


def test_simple_gilbert_loss_rate_and_mean_burst() -> None:
    model = GilbertElliott(p=0.02, r=0.25)
    lost = losses(model)
    assert model.loss_rate == pytest.approx(0.02 / 0.27)
    assert sum(lost) / N == pytest.approx(model.loss_rate, rel=0.05)
    runs = bursts(lost)
    assert sum(runs) / len(runs) == pytest.approx(1 / 0.25, rel=0.05)
    assert model.mean_burst == 4.0


def test_loss_in_both_states() -> None:
    model = GilbertElliott(p=0.1, r=0.4, loss_bad=0.5, loss_good=0.01)
    expected = 0.1 / 0.5 * 0.5 + 0.4 / 0.5 * 0.01
    assert model.loss_rate == pytest.approx(expected)
    assert sum(losses(model)) / N == pytest.approx(expected, rel=0.05)


def test_same_seed_same_losses_other_seed_others() -> None:
    model = GilbertElliott(p="5%", r="30%")
    assert losses(model, seed=7, n=5000) == losses(model, seed=7, n=5000)
    assert losses(model, seed=7, n=5000) != losses(model, seed=8, n=5000)


def test_max_burst_caps_runs_and_changes_nothing_else() -> None:
    free = GilbertElliott(p=0.05, r=0.05)
    capped = GilbertElliott(p=0.05, r=0.05, max_burst=3)
    free_lost, capped_lost = losses(free), losses(capped)
    assert max(bursts(free_lost)) > 3
    assert max(bursts(capped_lost)) == 3
    # Only losses are turned into passes; the chain and so every other decision is unchanged.
    assert all(f or not c for f, c in zip(free_lost, capped_lost, strict=True))


def test_degenerate_models() -> None:
    assert not any(losses(GilbertElliott(p=0, r=0.5), n=1000))
    assert all(losses(GilbertElliott(p=1, r=0), n=1000)[1:])
    assert GilbertElliott(p=0, r=0).loss_rate == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1.5, "r": 0.1}, r"GilbertElliott\(\): bad value for p=1\.5: use a probability"),
        ({"p": 0.1, "r": "x"}, "r='x'"),
        ({"p": 0.1, "r": 0.1, "loss_bad": True}, "loss_bad"),
        ({"p": 0.1, "r": 0.1, "max_burst": 0}, "max_burst"),
        ({"p": 0.1, "r": 0.1, "max_burst": 2.5}, "max_burst"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(OptionError, match=match):
        GilbertElliott(**kwargs)  # type: ignore[arg-type]


def test_parse_and_describe() -> None:
    model = GilbertElliott.parse("1%,30%")
    assert model == GilbertElliott(p=0.01, r=0.3)
    assert model.describe() == "GilbertElliott(p=0.01, r=0.3)"
    assert eval(model.describe()) == model  # the description is the call
    full = GilbertElliott.parse("0.1, 0.2, 0.9, 0.001")
    assert full == GilbertElliott(p=0.1, r=0.2, loss_bad=0.9, loss_good=0.001)
    assert "loss_good=0.001" in full.describe()
    with pytest.raises(OptionError, match=r"--gemodel: bad value for gemodel='0\.1': give p,r"):
        GilbertElliott.parse("0.1")
    with pytest.raises(OptionError, match=r"--gemodel: bad value for r=2\.0"):
        GilbertElliott.parse("0.1,2")
    with pytest.raises(TypeError):
        GilbertElliott(p=0.1)  # type: ignore[call-arg]
