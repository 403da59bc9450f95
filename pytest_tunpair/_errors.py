"""The exception tree. Every message says what happened *and* what to do next."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._capture import Packet

__all__ = [
    "HookError",
    "LeftoverProcessError",
    "LeftoverProcessWarning",
    "NamespaceError",
    "OptionError",
    "PacketTimeout",
    "PrivilegeError",
    "SpawnError",
    "TunDeviceError",
    "TunPairError",
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


class PacketTimeout(TunPairError, AssertionError):
    """``packets.wait_for`` saw no matching packet in time.

    The message lists what *was* captured, so the reader sees why nothing matched;
    ``packets`` holds those packets. The list is formatted when the message is first read,
    not when the timeout fires: decoding (and the first import of scapy) must not make the
    wait overrun its timeout.
    """

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


class SpawnError(TunPairError):
    """``tun_pair.spawn()``: the process exited, or was not ready in time (it is stopped).

    The message holds the command, its exit status and the last lines of its output.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] | str,
        returncode: int | None,
        output: str,
    ) -> None:
        super().__init__(message)
        self.command: Any = command
        """The ``args`` given to ``spawn``."""
        self.returncode = returncode
        """Its exit status (negative: killed by that signal), ``None`` if unknown."""
        self.output = output
        """The last lines of what it wrote ("" when its output went where the caller said)."""


class LeftoverProcessError(TunPairError):
    """Processes not started with ``spawn`` were still running in the namespace at the end
    (``--tunpair-leftovers=fail``); they have been stopped."""

    def __init__(self, message: str, *, processes: Sequence[str]) -> None:
        super().__init__(message)
        self.processes = list(processes)
        """``"PID (command line)"`` of each."""


class LeftoverProcessWarning(UserWarning):
    """Processes not started with ``spawn`` were still running in the namespace at the end
    (``--tunpair-leftovers=warn``, the default); they have been stopped."""


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
    SpawnError,
    LeftoverProcessError,
    LeftoverProcessWarning,
):
    _cls.__module__ = "pytest_tunpair"
del _cls
