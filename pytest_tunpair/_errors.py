"""The exception tree. Every message says what happened *and* what to do next."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._capture import Packet

__all__ = [
    "HookError",
    "NamespaceError",
    "OptionError",
    "PacketTimeout",
    "PrivilegeError",
    "TunDeviceError",
    "TunPairError",
    "UnexpectedPacket",
]


class TunPairError(Exception):
    """Base of every error pytest-tunpair raises on purpose."""


class OptionError(TunPairError, ValueError):
    """A pair option (marker, factory argument, command line or ini key) has a bad value."""

    def __init__(self, message: str, *, option: str, source: str) -> None:
        super().__init__(message)
        self.option = option
        self.source = source


class PrivilegeError(TunPairError, PermissionError):
    """The process may not create network namespaces or TUN devices here."""


class TunDeviceError(TunPairError, OSError):
    """Opening or configuring a TUN/TAP device failed."""

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(message)
        self.device = device


class NamespaceError(TunPairError, OSError):
    """Entering, leaving or configuring the test's network namespace failed."""

    def __init__(self, message: str, *, netns: str | None = None) -> None:
        super().__init__(message)
        self.netns = netns


class HookError(TunPairError, AssertionError):
    """A hook raised or returned something the relay cannot send.

    Raised in the test thread; the hook's own exception is the ``__cause__``, so pytest
    shows its traceback.
    """

    def __init__(self, message: str, *, hook: str, direction: str) -> None:
        super().__init__(message)
        self.hook = hook
        self.direction = direction


class _PacketAssertion(TunPairError, AssertionError):
    """An assertion about captured packets that failed; ``packets`` holds the ones it
    looked at. The message's packet list is formatted when the message is first read, not
    when the assertion fails: decoding (and the first import of scapy) must not make a wait
    overrun its timeout."""

    def __init__(
        self,
        message: str,
        *,
        packets: Sequence[Packet] = (),
        details: Callable[[], str] | None = None,
    ) -> None:
        super().__init__(message)
        self.packets = list(packets)
        self._message = message
        self._details = details
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._message + (self._details() if self._details else "")
        return self._text


class PacketTimeout(_PacketAssertion):
    """No matching packet came in time (``packets.wait_for``, ``expect``,
    ``expect_sequence``, ``wait_quiet``).

    The message lists what *was* captured, and for ``expect`` the fields in which the
    closest packets differed, so the reader sees why nothing matched.
    """


class UnexpectedPacket(_PacketAssertion):
    """``packets.expect_none`` saw a packet it was told must not come.

    ``packet`` is that packet; ``packets`` what was examined up to it.
    """

    def __init__(
        self,
        message: str,
        *,
        packet: Packet,
        packets: Sequence[Packet] = (),
        details: Callable[[], str] | None = None,
    ) -> None:
        super().__init__(message, packets=packets, details=details)
        self.packet = packet


# Tracebacks name the errors where users import them from: ``pytest_tunpair.PacketTimeout``,
# not ``pytest_tunpair._errors.PacketTimeout``, whichever module raised them (as trio does).
for _cls in (
    TunPairError,
    OptionError,
    PrivilegeError,
    TunDeviceError,
    NamespaceError,
    HookError,
    PacketTimeout,
    UnexpectedPacket,
):
    _cls.__module__ = "pytest_tunpair"
del _cls
