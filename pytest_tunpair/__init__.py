"""pytest-tunpair: a real in-kernel TUN/TAP pair per test, routed through a userspace relay.

Importing the package is cheap: scapy and pyroute2 load only when a pair is opened or a
packet decoded.
"""

from __future__ import annotations

from ._capture import Capture, GsoInfo, Packet
from ._errors import (
    HookError,
    NamespaceError,
    OptionError,
    PacketTimeout,
    PrivilegeError,
    TunDeviceError,
    TunPairError,
)
from ._options import PairOptions
from ._pair import Endpoint, TunPair, TunPairFactory
from ._relay import Hook

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "Endpoint",
    "GsoInfo",
    "Hook",
    "HookError",
    "NamespaceError",
    "OptionError",
    "Packet",
    "PacketTimeout",
    "PairOptions",
    "PrivilegeError",
    "TunDeviceError",
    "TunPair",
    "TunPairError",
    "TunPairFactory",
    "__version__",
]

# Show the public names where users import them from (tracebacks read
# ``pytest_tunpair.PacketTimeout``, not ``pytest_tunpair._errors.PacketTimeout``), as trio does.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
