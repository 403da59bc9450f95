"""Pair options: one validated record, whatever the source (marker, factory call, CLI).

Each option is one field below, declared with its kind, default and help
(``_schema.option``); validation, the command-line flags, the marker's help and the table in
``docs/options.md`` all come from these declarations."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import OptionError
from ._schema import (
    Bool,
    Choice,
    Duration,
    Int,
    Invalid,
    Kind,
    declared,
    option,
    unknown,
    validate,
)

__all__ = ["DEFAULT_CAPTURE_BYTES", "PairOptions"]

#: Default capture budget: once the kept packets cost the process more than this many bytes
#: (their bytes plus bookkeeping, see ``Capture.record_locked``) the oldest are forgotten
#: (``stats`` keeps counting). Enough for every packet of an ordinary protocol test,
#: small enough that a test moving gigabytes does not exhaust memory.
DEFAULT_CAPTURE_BYTES = 64 * 1024 * 1024

_IFNAMSIZ = 16  # include/uapi/linux/if.h: names are at most 15 bytes plus NUL
_RESERVED_TABLES = {0, 253, 254, 255}  # unspec, default, main, local


def _default_names(mode: str, index: int) -> tuple[str, str]:
    return (f"{mode}{2 * index}", f"{mode}{2 * index + 1}")


def _default_ipv4(index: int) -> tuple[str, str]:
    # RFC 2544 benchmarking range: never routed on the internet, so a mistake cannot leak.
    return (f"198.18.0.{2 * index + 1}", f"198.18.0.{2 * index + 2}")


def _default_ipv6(index: int) -> tuple[str, str]:
    # RFC 5180 benchmarking prefix, same reasoning.
    return (f"2001:2::{2 * index + 1:x}", f"2001:2::{2 * index + 2:x}")


class DeviceNames(Kind):
    """Two distinct interface names."""

    allowed = "two device names (1-15 characters, no '/', ':' or space)"
    metavar = "A B"

    def check(self, value: object) -> tuple[str, str]:
        if (
            not isinstance(value, (tuple, list))
            or len(value) != 2
            or not all(isinstance(n, str) for n in value)
        ):
            raise Invalid("give two device names, e.g. names=('tun0', 'tun1')")
        for n in value:
            if not n or len(n.encode()) >= _IFNAMSIZ or any(c in n for c in "/: \t\n%"):
                raise Invalid(f"{n!r} is not a valid device name (1-15 chars, no '/', ':', space)")
        if value[0] == value[1]:
            raise Invalid("the two devices need different names")
        return (value[0], value[1])

    def format(self, value: Any) -> str:
        return repr(tuple(value))


class AddressPair(Kind):
    """Two distinct unicast addresses of one IP version, or None (no such family)."""

    metavar = "A B"

    def __init__(self, version: int) -> None:
        self.version = version
        self.example = (
            "('198.18.0.1', '198.18.0.2')" if version == 4 else "('2001:2::1', '2001:2::2')"
        )
        self.allowed = f"two IPv{version} addresses, or None (no IPv{version})"

    def check(self, value: object) -> tuple[str, str] | None:
        if value is None:
            return None
        key = f"ipv{self.version}"
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise Invalid(f"give two addresses, e.g. {key}={self.example}, or None")
        out = []
        for item in value:
            try:
                addr = ipaddress.ip_address(str(item))
            except ValueError:
                raise Invalid(f"{item!r} is not an IPv{self.version} address") from None
            if addr.version != self.version:
                raise Invalid(f"{item!r} is not an IPv{self.version} address")
            if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
                raise Invalid(f"{item} cannot be an interface address")
            out.append(str(addr))
        if out[0] == out[1]:
            raise Invalid("the two ends need different addresses")
        return (out[0], out[1])

    def format(self, value: Any) -> str:
        return "None" if value is None else repr(tuple(value))


class RoutingTable(Int):
    def check(self, value: object) -> int | None:
        table = super().check(value)
        if table in _RESERVED_TABLES:
            raise Invalid("tables 253 (default), 254 (main) and 255 (local) are taken")
        return table


# PairOptions.from_kwargs's memory of valid options: (index, kwargs) -> the record.
_VALID: dict[Any, PairOptions] = {}
_VALID_MAX = 256


@dataclass(frozen=True)
class PairOptions:
    """Everything that shapes one pair; construction validates (``PairOptions(mtu="big")``
    raises :class:`~pytest_tunpair.OptionError`). :meth:`from_kwargs` also picks the
    defaults of the n-th pair of a test."""

    mode: str = option(
        "tun",
        Choice(("tun", "tap"), reason="use 'tun' (raw IP) or 'tap' (Ethernet)"),
        "raw IP (tun) or Ethernet (tap) devices",
    )
    names: tuple[str, str] = option(
        ("tun0", "tun1"),
        DeviceNames(),
        "device names of ends a and b",
        nargs=2,
        default_doc="('tun0', 'tun1'); the n-th pair of a test: tun2n, tun2n+1 (tap: tap...)",
    )
    ipv4: tuple[str, str] | None = option(
        ("198.18.0.1", "198.18.0.2"),
        AddressPair(4),
        "IPv4 addresses of ends a and b (RFC 2544 benchmarking range by default)",
        nargs=2,
        none_flag="--no-ipv4",
        default_doc="('198.18.0.1', '198.18.0.2'); the n-th pair: 198.18.0.2n+1, .2n+2",
    )
    ipv6: tuple[str, str] | None = option(
        ("2001:2::1", "2001:2::2"),
        AddressPair(6),
        "IPv6 addresses of ends a and b (RFC 5180 benchmarking prefix by default)",
        nargs=2,
        none_flag="--no-ipv6",
        default_doc="('2001:2::1', '2001:2::2'); the n-th pair: 2001:2::2n+1, ::2n+2",
    )
    hosts: bool = option(
        False,
        Bool(),
        "each end its own host: b's device in a network namespace of its own (a stays in "
        "the pair's, with the test), plain point-to-point routes instead of the routing "
        "recipe",
    )
    mtu: int = option(1500, Int(68, 65535), "MTU of both devices (IPv6 needs at least 1280)")
    table: int = option(
        13,
        RoutingTable(1, 2**32 - 1),
        "routing table holding the pair's local routes (not 253, 254, 255)",
    )
    offload: bool = option(
        True,
        Bool(),
        "TSO/checksum offload towards the relay (GSO super-packets in the capture); "
        "off while a hook, a rule or a scripted peer is set (impairments keep it on: a "
        "per-segment link splits super-packets in the relay)",
    )
    max_packets: int | None = option(
        None,
        Int(0, optional=True),
        "keep only the newest N packets in the capture (None: no count limit)",
        group="capture",
    )
    snaplen: int | None = option(
        None,
        Int(1, optional=True),
        "keep only the first N bytes of each captured packet",
        group="capture",
    )
    capture_bytes: int | None = option(
        DEFAULT_CAPTURE_BYTES,
        Int(0, optional=True),
        "capture budget in bytes (packets plus bookkeeping); the oldest are forgotten "
        "beyond it, stats keep counting; None: unbounded",
        group="capture",
        default_doc="67108864 (64 MiB)",
    )
    keylog: bool = option(
        True,
        Bool(),
        "a TLS/QUIC key log for the pair (tun_pair.keylog; SSLKEYLOGFILE of spawn()ed "
        "processes), embedded in its pcapng files so that they open decrypted",
        group="capture",
    )
    seed: int | None = option(
        None,
        Int(0, optional=True),
        "seed of impair() when it is given none (None: random per test, shown in reports)",
        group="impair",
    )
    txqueuelen: int = option(
        5000,
        Int(1, 2**31 - 1),
        "transmit queue length of both devices (the kernel's 500 drops at full speed)",
    )
    drain: float = option(
        1.0,
        Duration(),
        "how long teardown waits for packets still in the relay (delayed, rate-limited, "
        "held) to be delivered, so peers see a closing connection's FINs; 0: drop them",
    )

    def __post_init__(self) -> None:
        self._validate("PairOptions()")

    def _validate(self, source: str) -> None:
        validate(self, source=source)
        if self.ipv4 is None and self.ipv6 is None:
            raise OptionError(
                "ipv4",
                None,
                source=source,
                reason="ipv4=None and ipv6=None leave the pair without addresses; "
                "keep at least one family",
            )
        if self.ipv6 is not None and self.mtu < 1280:
            raise OptionError(
                "mtu",
                self.mtu,
                source=source,
                reason="IPv6 needs an MTU of at least 1280 (or pass ipv6=None)",
            )

    @classmethod
    def names_allowed(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f, _ in declared(cls)]

    @classmethod
    def from_kwargs(
        cls,
        kwargs: Mapping[str, Any],
        *,
        source: str = "TunPair()",
        index: int = 0,
    ) -> PairOptions:
        """Validate ``kwargs``; ``source`` names where they came from in error messages.

        ``index`` picks the defaults for the n-th pair of a namespace (``tun2``/``tun3``,
        ``198.18.0.3``/``198.18.0.4``...) so factory pairs never collide.

        Valid options are remembered (the record is frozen): a run's tests mostly ask for
        the same few, and checking them costs a tenth of a pair's setup.
        """
        try:
            # With each value's type: True == 1 == 1.0, and only one of them may be valid.
            key: Any = (index, frozenset((k, type(v), v) for k, v in kwargs.items()))
            known = _VALID.get(key)
        except TypeError:  # an unhashable value (a list of addresses): checked each time
            key = known = None
        if known is not None:
            return known
        options = cls._check(kwargs, source, index)
        if key is not None:
            if len(_VALID) >= _VALID_MAX:
                _VALID.clear()
            _VALID[key] = options
        return options

    @classmethod
    def _check(cls, kwargs: Mapping[str, Any], source: str, index: int) -> PairOptions:
        allowed = cls.names_allowed()
        for key, value in kwargs.items():
            if key not in allowed:
                error = unknown(key, value, allowed, source=source)
                # The one place both kinds of keyword meet: say where the other kind goes.
                raise OptionError(
                    key,
                    value,
                    source=source,
                    reason=f"{error.reason}; impairments (loss, delay, rate, profile, ...) "
                    "are set with pair.impair(...) or @pytest.mark.impair(...)",
                    unknown=True,
                )
        values = dict(kwargs)
        mode = values.get("mode", "tun")
        values.setdefault("names", _default_names(mode if isinstance(mode, str) else "tun", index))
        values.setdefault("ipv4", _default_ipv4(index))
        values.setdefault("ipv6", _default_ipv6(index))
        try:
            return cls(**values)
        except OptionError as exc:
            raise exc.with_source(source) from None
