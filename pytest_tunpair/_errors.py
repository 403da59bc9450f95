"""The exception tree. Every message says what happened *and* what to do next.

::

    TunPairError                       everything pytest-tunpair raises on purpose
    ├── OptionError (ValueError)       a bad option: .option, .value, .source, .reason
    ├── PrivilegeError (PermissionError)   no way to create namespaces or TUN devices here
    ├── TunDeviceError (OSError)       opening or configuring a device failed (.device)
    ├── NamespaceError (OSError)       entering/leaving/configuring a namespace failed (.netns)
    ├── PairClosedError (RuntimeError) the pair is not open (not yet, or any more)
    ├── HookError (AssertionError)     a hook raised or returned something unsendable
    ├── PacketTimeout (AssertionError) no matching packet in time (wait_for, expect, ...)
    ├── UnexpectedPacket (AssertionError)  ``expect_none`` saw a packet it must not (.packet)
    ├── ThreadNotStopped               an interruption could not stop a test's own thread
    ├── SpawnError                     ``spawn()``: exited or not ready (.command, .returncode)
    ├── LeftoverProcessError           processes left running in the namespace (.processes)
    └── BlockingWaitError (RuntimeError)   a blocking wait on an event loop's thread (.use)

    LeftoverProcessWarning (UserWarning)   processes, under --tunpair-leftovers=warn
    LeftoverThreadWarning (UserWarning)    threads, under --tunpair-leftovers=warn or kill
    ThreadNamespaceWarning (UserWarning)   work given to a pool whose threads live elsewhere
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._packets.packet import Packet

__all__ = [
    "BlockingWaitError",
    "HookError",
    "LeftoverProcessError",
    "LeftoverProcessWarning",
    "LeftoverThreadWarning",
    "NamespaceError",
    "OptionError",
    "PacketTimeout",
    "PairClosedError",
    "PrivilegeError",
    "SpawnError",
    "ThreadNamespaceWarning",
    "ThreadNotStopped",
    "TunDeviceError",
    "TunPairError",
    "UnexpectedPacket",
]


class TunPairError(Exception):
    """Base of every error pytest-tunpair raises on purpose."""


class OptionError(TunPairError, ValueError):
    """An option (marker, factory or ``impair()`` argument, command line, ini key) is bad.

    The parts are kept apart so each front end can phrase them for its user (the command
    line names its flag, the plugin the marker): ``str()`` is the generic form,
    ``"<source>: bad value for <option>=<value>: <reason>"`` (or ``unknown option``).
    """

    def __init__(
        self, option: str, value: object, *, source: str, reason: str, unknown: bool = False
    ) -> None:
        self.option = option
        """The option's name, e.g. ``"mtu"``."""
        self.value = value
        """The value given (for an unknown option: the value given to it)."""
        self.source = source
        """Where it came from: ``"@pytest.mark.tunpair"``, ``"--mtu"``, ``"impair()"``..."""
        self.reason = reason
        """What is wrong and what to give instead, e.g. ``"use a whole number from 68..."``."""
        self.unknown = unknown
        """True when no option has this name (``reason`` then lists the known ones)."""
        super().__init__(self._message())

    def _message(self) -> str:
        if self.unknown:
            return f"{self.source}: unknown option {self.option!r}; {self.reason}"
        return f"{self.source}: bad value for {self.option}={self.value!r}: {self.reason}"

    def with_source(self, source: str) -> OptionError:
        """The same error, as coming from ``source``."""
        return OptionError(
            self.option, self.value, source=source, reason=self.reason, unknown=self.unknown
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only parts: the default pickling (xdist sends errors between processes)
        # would call OptionError(message) and fail.
        return (
            _rebuild_option_error,
            (self.option, self.value, self.source, self.reason, self.unknown),
        )


def _rebuild_option_error(
    option: str, value: object, source: str, reason: str, unknown: bool
) -> OptionError:
    return OptionError(option, value, source=source, reason=reason, unknown=unknown)


class PrivilegeError(TunPairError, PermissionError):
    """The process may not create network namespaces or TUN devices here."""


class TunDeviceError(TunPairError, OSError):
    """Opening or configuring a TUN/TAP device failed."""

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(message)
        self.device = device
        """The name of the device concerned, if known."""


class NamespaceError(TunPairError, OSError):
    """Entering, leaving or configuring the test's network namespace failed."""

    def __init__(self, message: str, *, netns: str | None = None) -> None:
        super().__init__(message)
        self.netns = netns
        """The namespace concerned (an ``nsenter --net=`` path), if known."""


class PairClosedError(TunPairError, RuntimeError):
    """The pair is not open: it was never opened, or it is closed already."""


class ThreadNotStopped(TunPairError):
    """An interruption (e.g. a pytest-timeout failure) could not stop a test's own thread.

    Only in runs where tunnel tests run on threads of their own (a user namespace the
    process entered by itself); the message says which pytest-timeout setting avoids it.
    """


class HookError(TunPairError, AssertionError):
    """A hook raised or returned something the relay cannot send.

    Raised in the test thread; the hook's own exception is the ``__cause__``, so pytest
    shows its traceback.
    """

    def __init__(self, message: str, *, hook: str, direction: str) -> None:
        super().__init__(message)
        self.hook = hook
        """The hook that failed (its ``Hook`` handle)."""
        self.direction = direction
        """The direction of the packet it failed on."""


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
        """Every packet captured when the wait gave up (the message shows the first and last)."""
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
        """The packet ``expect_none`` was told must not come."""


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


class LeftoverThreadWarning(UserWarning):
    """Threads started in the test's namespace were still running at its end
    (``--tunpair-leftovers=warn``, the default, or ``kill``: threads cannot be killed)."""


class ThreadNamespaceWarning(UserWarning):
    """The test gave work to a thread pool whose threads live in another network namespace
    (the host's, or an earlier test's): that work does not reach the pair. Use
    ``tun_pair.executor()``."""


class BlockingWaitError(TunPairError, RuntimeError):
    """A blocking wait (``packets.wait_for()``, ``peer.expect()``, ...) was called on the
    thread that runs an event loop: it would stall the loop until its timeout. The message
    names the awaitable form to use instead (``await packets.wait_for_async(...)``)."""

    def __init__(self, message: str, *, use: str) -> None:
        super().__init__(message)
        self.use = use
        """The awaitable form to call instead, e.g. ``"packets.wait_for_async"``."""


# Tracebacks name the errors where users import them from: ``pytest_tunpair.PacketTimeout``,
# not ``pytest_tunpair._errors.PacketTimeout``, whichever module raised them (as trio does).
for _cls in (
    TunPairError,
    OptionError,
    PrivilegeError,
    TunDeviceError,
    NamespaceError,
    PairClosedError,
    ThreadNotStopped,
    HookError,
    PacketTimeout,
    UnexpectedPacket,
    SpawnError,
    LeftoverProcessError,
    LeftoverProcessWarning,
    LeftoverThreadWarning,
    ThreadNamespaceWarning,
    BlockingWaitError,
):
    _cls.__module__ = "pytest_tunpair"
del _cls
