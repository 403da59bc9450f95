"""Pair options: one validated record, whatever the source (marker, factory call, CLI)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ._errors import OptionError

__all__ = ["DEFAULT_CAPTURE_BYTES", "PairOptions"]

#: Default capture budget: once the kept packets cost the process more than this many bytes
#: (their bytes plus bookkeeping, see ``Capture.record_many``) the oldest are forgotten
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


@dataclass(frozen=True)
class PairOptions:
    """Everything that shapes one pair. Build it with :meth:`from_kwargs` to get validation."""

    mode: str = "tun"
    names: tuple[str, str] = ("tun0", "tun1")
    ipv4: tuple[str, str] | None = ("198.18.0.1", "198.18.0.2")
    ipv6: tuple[str, str] | None = ("2001:2::1", "2001:2::2")
    mtu: int = 1500
    table: int = 13
    offload: bool = True
    max_packets: int | None = None
    snaplen: int | None = None
    capture_bytes: int | None = DEFAULT_CAPTURE_BYTES
    seed: int | None = None
    txqueuelen: int = 5000
    drain: float = 1.0
    """Seconds the pair's teardown waits for packets still in the relay (delayed,
    rate-limited, held for reordering) to be delivered; 0: drop them at once."""
    _given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def names_allowed(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_")]

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
        """
        allowed = cls.names_allowed()
        for key in kwargs:
            if key not in allowed:
                raise OptionError(
                    f"{source}: unknown option {key!r}; the options are: {', '.join(allowed)}",
                    option=key,
                    source=source,
                )

        def fail(key: str, why: str) -> OptionError:
            return OptionError(
                f"{source}: bad value for {key}={kwargs[key]!r}: {why}", option=key, source=source
            )

        mode = kwargs.get("mode", "tun")
        if mode not in ("tun", "tap"):
            raise fail("mode", "use 'tun' (raw IP) or 'tap' (Ethernet)")

        names = kwargs.get("names", _default_names(mode, index))
        if (
            not isinstance(names, (tuple, list))
            or len(names) != 2
            or not all(isinstance(n, str) for n in names)
        ):
            raise fail("names", "give two device names, e.g. names=('tun0', 'tun1')")
        for n in names:
            if not n or len(n.encode()) >= _IFNAMSIZ or any(c in n for c in "/: \t\n%"):
                raise fail(
                    "names", f"{n!r} is not a valid device name (1-15 chars, no '/', ':', space)"
                )
        if names[0] == names[1]:
            raise fail("names", "the two devices need different names")

        ipv4 = _addr_pair(kwargs, "ipv4", 4, _default_ipv4(index), fail)
        ipv6 = _addr_pair(kwargs, "ipv6", 6, _default_ipv6(index), fail)
        if ipv4 is None and ipv6 is None:
            raise OptionError(
                f"{source}: ipv4=None and ipv6=None leave the pair without addresses; "
                "keep at least one family",
                option="ipv4",
                source=source,
            )

        mtu = _int(kwargs, "mtu", 1500, fail, lo=68, hi=65535)
        if ipv6 is not None and mtu < 1280:
            raise fail("mtu", "IPv6 needs an MTU of at least 1280 (or pass ipv6=None)")
        table = _int(kwargs, "table", 13, fail, lo=1, hi=2**32 - 1)
        if table in _RESERVED_TABLES:
            raise fail("table", "tables 253 (default), 254 (main) and 255 (local) are taken")
        offload = kwargs.get("offload", True)
        if not isinstance(offload, bool):
            raise fail("offload", "use True or False")
        max_packets = _opt_int(kwargs, "max_packets", None, fail, lo=0)
        snaplen = _opt_int(kwargs, "snaplen", None, fail, lo=1)
        capture_bytes = _opt_int(kwargs, "capture_bytes", DEFAULT_CAPTURE_BYTES, fail, lo=0)
        seed = _opt_int(kwargs, "seed", None, fail, lo=0)
        txqueuelen = _int(kwargs, "txqueuelen", 5000, fail, lo=1, hi=2**31 - 1)
        drain = _seconds(kwargs, "drain", 1.0, fail)
        return cls(
            mode=mode,
            names=(names[0], names[1]),
            ipv4=ipv4,
            ipv6=ipv6,
            mtu=mtu,
            table=table,
            offload=offload,
            max_packets=max_packets,
            snaplen=snaplen,
            capture_bytes=capture_bytes,
            seed=seed,
            txqueuelen=txqueuelen,
            drain=drain,
            _given=frozenset(kwargs),
        )


def _int(kwargs: Mapping[str, Any], key: str, default: int, fail: Any, *, lo: int, hi: int) -> int:
    value = kwargs.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(key, f"use a whole number from {lo} to {hi}")
    if not lo <= value <= hi:
        raise fail(key, f"use a whole number from {lo} to {hi}")
    return value


def _seconds(kwargs: Mapping[str, Any], key: str, default: float, fail: Any) -> float:
    from ._impair import _DURATION, _duration

    value = kwargs.get(key, default)
    try:
        return _duration(key, value)
    except ValueError:
        raise fail(key, f"use {_DURATION}") from None


def _opt_int(
    kwargs: Mapping[str, Any], key: str, default: int | None, fail: Any, *, lo: int
) -> int | None:
    value = kwargs.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise fail(key, f"use None or a whole number >= {lo}")
    return value


def _addr_pair(
    kwargs: Mapping[str, Any],
    key: str,
    version: int,
    default: tuple[str, str],
    fail: Any,
) -> tuple[str, str] | None:
    if key not in kwargs:
        return default
    value = kwargs[key]
    if value is None:
        return None
    example = "('198.18.0.1', '198.18.0.2')" if version == 4 else "('2001:2::1', '2001:2::2')"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise fail(key, f"give two addresses, e.g. {key}={example}, or None")
    out = []
    for item in value:
        try:
            addr = ipaddress.ip_address(str(item))
        except ValueError:
            raise fail(key, f"{item!r} is not an IPv{version} address") from None
        if addr.version != version:
            raise fail(key, f"{item!r} is not an IPv{version} address")
        if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
            raise fail(key, f"{item} cannot be an interface address")
        out.append(str(addr))
    if out[0] == out[1]:
        raise fail(key, "the two ends need different addresses")
    return (out[0], out[1])
