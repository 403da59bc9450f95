"""pytest-tunpair: a real in-kernel TUN/TAP pair per test, routed through a userspace relay.

Importing the package is cheap: the public names load on first use (PEP 562), and scapy and
pyroute2 only when a pair is opened or a packet decoded. pytest imports
``pytest_tunpair.plugin`` (and so this file) in every run of every project that installs
the plugin, including runs that never open a tunnel.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import (
        BlockingWaitError,
        HookError,
        LeftoverProcessError,
        LeftoverProcessWarning,
        LeftoverThreadWarning,
        NamespaceError,
        OptionError,
        PacketTimeout,
        PairClosedError,
        PrivilegeError,
        SpawnError,
        ThreadNamespaceWarning,
        ThreadNotStopped,
        TunDeviceError,
        TunPairError,
        UnexpectedPacket,
    )
    from ._factory import FactoryCheckpoint, TunPairFactory
    from ._kernel.host import Host
    from ._kernel.netns import Visit
    from ._kernel.resolver import DnsQuery, Resolver
    from ._kernel.sockets import SocketInfo
    from ._link.endpoint import Endpoint
    from ._link.gemodel import GilbertElliott, GilbertElliottChain
    from ._link.hooks import Hook
    from ._link.nat import Nat, NatMapping, NatTranslation
    from ._link.rules import Fault, Outage, PathMtu
    from ._options import PairOptions
    from ._packets.capture import Capture
    from ._packets.flows import Flow
    from ._packets.match import PacketSource, expect, expect_none, expect_sequence
    from ._packets.packet import GsoInfo, Packet
    from ._packets.tls import TlsRecord
    from ._pair import Checkpoint, TunPair
    from ._peer.peer import ScriptedPeer, ScriptedTcp, ScriptedUdp
    from ._topology import Topology
    from ._wire.tcp import TcpOptions

__version__ = "0.1.0"

_WHERE = {
    "Capture": "._packets.capture",
    "GsoInfo": "._packets.packet",
    "Packet": "._packets.packet",
    "BlockingWaitError": "._errors",
    "TlsRecord": "._packets.tls",
    "HookError": "._errors",
    "LeftoverProcessError": "._errors",
    "LeftoverProcessWarning": "._errors",
    "LeftoverThreadWarning": "._errors",
    "NamespaceError": "._errors",
    "OptionError": "._errors",
    "PacketTimeout": "._errors",
    "PairClosedError": "._errors",
    "PrivilegeError": "._errors",
    "SpawnError": "._errors",
    "ThreadNamespaceWarning": "._errors",
    "ThreadNotStopped": "._errors",
    "TunDeviceError": "._errors",
    "TunPairError": "._errors",
    "UnexpectedPacket": "._errors",
    "Flow": "._packets.flows",
    "GilbertElliott": "._link.gemodel",
    "GilbertElliottChain": "._link.gemodel",
    "Fault": "._link.rules",
    "Outage": "._link.rules",
    "PathMtu": "._link.rules",
    "PacketSource": "._packets.match",
    "expect": "._packets.match",
    "expect_none": "._packets.match",
    "expect_sequence": "._packets.match",
    "Visit": "._kernel.netns",
    "SocketInfo": "._kernel.sockets",
    "PairOptions": "._options",
    "Endpoint": "._link.endpoint",
    "TunPair": "._pair",
    "Checkpoint": "._pair",
    "FactoryCheckpoint": "._factory",
    "Topology": "._topology",
    "TunPairFactory": "._factory",
    "Hook": "._link.hooks",
    "Host": "._kernel.host",
    "DnsQuery": "._kernel.resolver",
    "Resolver": "._kernel.resolver",
    "Nat": "._link.nat",
    "NatMapping": "._link.nat",
    "NatTranslation": "._link.nat",
    "ScriptedPeer": "._peer.peer",
    "ScriptedTcp": "._peer.peer",
    "ScriptedUdp": "._peer.peer",
    "TcpOptions": "._wire.tcp",
}

__all__ = [
    "BlockingWaitError",
    "Capture",
    "Checkpoint",
    "DnsQuery",
    "Endpoint",
    "FactoryCheckpoint",
    "Fault",
    "Flow",
    "GilbertElliott",
    "GilbertElliottChain",
    "GsoInfo",
    "Hook",
    "HookError",
    "Host",
    "LeftoverProcessError",
    "LeftoverProcessWarning",
    "LeftoverThreadWarning",
    "NamespaceError",
    "Nat",
    "NatMapping",
    "NatTranslation",
    "OptionError",
    "Outage",
    "Packet",
    "PacketSource",
    "PacketTimeout",
    "PairClosedError",
    "PairOptions",
    "PathMtu",
    "PrivilegeError",
    "Resolver",
    "ScriptedPeer",
    "ScriptedTcp",
    "ScriptedUdp",
    "SocketInfo",
    "SpawnError",
    "TcpOptions",
    "ThreadNamespaceWarning",
    "ThreadNotStopped",
    "TlsRecord",
    "Topology",
    "TunDeviceError",
    "TunPair",
    "TunPairError",
    "TunPairFactory",
    "UnexpectedPacket",
    "Visit",
    "__version__",
    "expect",
    "expect_none",
    "expect_sequence",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    obj = getattr(importlib.import_module(module, __name__), name)
    # Show public names where users import them from (tracebacks read
    # ``pytest_tunpair.PacketTimeout``, not ``pytest_tunpair._errors.PacketTimeout``), as
    # trio does; done here so that the classes a plugin run imports early get it too.
    obj.__module__ = __name__
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
