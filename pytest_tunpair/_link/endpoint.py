"""An end of the pair (``tun_pair.a``, ``tun_pair.b``): its device, addresses, inject, and
the host it sits in (run code, spawn daemons, sysctls, sockets there)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import TunDeviceError
from .._packets.packet import Packet
from .._wire.validate import to_bytes, validate_frame

if TYPE_CHECKING:
    from .._kernel.device import TunDevice
    from .._kernel.host import Host
    from .._kernel.sockets import SocketInfo
    from .relay import Relay

__all__ = ["Endpoint"]

T = TypeVar("T")


class Endpoint:
    """One end of the pair (``tun_pair.a`` / ``tun_pair.b``)."""

    def __init__(
        self,
        relay: Relay,
        device: TunDevice,
        *,
        ip: str | None,
        ip6: str | None,
        mtu: int,
        mac: str | None,
        side: str,
        host: Host,
        spawn_env: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._relay = relay
        # The pair's: sets SSLKEYLOGFILE in the Popen keywords of what spawn() starts.
        self._spawn_env = spawn_env
        self._device = device
        self.name = device.name
        """The device's name, e.g. ``"tun0"``."""
        self.index = device.index
        """The device's ifindex inside the pair's namespace."""
        self.ip = ip
        """This end's IPv4 address (``"198.18.0.1"`` for a), or ``None`` without IPv4."""
        self.ip6 = ip6
        """This end's IPv6 address (``"2001:2::1"`` for a), or ``None`` without IPv6."""
        self.mtu = mtu
        """The device's MTU."""
        self.mac = mac
        """The TAP device's MAC (``02:74:70:00:<pair>:01``/``:02``, the same on every run); ``None``
        for TUN.
        """
        self._side = side  # "a" or "b": where Relay.write puts what inject() gets
        self.host = host
        """The :class:`~pytest_tunpair.Host` this end's device is in: its own namespace in
        hosts mode; the pair's (shared by both ends) otherwise."""

    @property
    def mode(self) -> str:
        """``"tun"`` or ``"tap"``."""
        return self._device.mode

    def inject(self, packet: Any) -> Packet:
        """Write ``packet`` into this device: the kernel receives it on this interface.

        Takes bytes or a scapy packet: an IPv4/IPv6 packet on TUN, an Ethernet frame on
        TAP. Bad input raises ``TypeError``/``ValueError`` and writes nothing.
        """
        data = to_bytes(packet, what=f"{self.name}.inject()")
        validate_frame(data, mode=self.mode, mtu=self.mtu)
        relay = self._relay
        if self._device.fd is None:
            raise TunDeviceError(f"{self.name} is closed", device=self.name)
        # The relay records the packet *before* writing it (in one critical section with the
        # write): a write into the device runs the kernel's receive path in this thread, so
        # the kernel's answer (an echo reply, or the ARP request it needs first on TAP) is
        # queued, read and recorded by the relay before os.write() returns.
        try:
            return relay.write(self._side, data)
        except OSError as exc:  # validated, but the device refused it (EIO while down)
            raise TunDeviceError(
                f"{self.name}: writing the injected packet failed: {exc}", device=self.name
            ) from exc

    # -- the host this end sits in ----------------------------------------------------------
    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` inside this end's host (:meth:`Host.run`)."""
        return self.host.run(fn, *args, **kwargs)

    def entered(self) -> AbstractContextManager[Host]:
        """``with tun_pair.b.entered(): ...``: the block runs inside this end's host
        (:meth:`Host.entered`)."""
        return self.host.entered()

    def spawn(
        self,
        args: Sequence[str] | str,
        *,
        ready: object = None,
        timeout: float = 10.0,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start a process in this end's host (:meth:`Host.spawn`; ``TunPair.spawn``'s
        ``ready`` forms and teardown, and its ``SSLKEYLOGFILE`` pointing at the pair's
        key log)."""
        if self._spawn_env is not None:
            self._spawn_env(popen_kwargs)
        return self.host.spawn(args, ready=ready, timeout=timeout, **popen_kwargs)

    def output(self, proc: subprocess.Popen[Any]) -> str:
        """What a process :meth:`spawn` started wrote (:meth:`Host.output`)."""
        return self.host.output(proc)

    def sysctl(self, name: str, value: str | int | None = None) -> str:
        """Read or set a ``net.*`` sysctl of this end's host (:meth:`Host.sysctl`). In
        one-namespace mode both ends share one host: set it on either, it holds for both."""
        return self.host.sysctl(name, value)

    def sockets(self, proto: str = "tcp") -> list[SocketInfo]:
        """The ``proto`` sockets of this end's host (:meth:`Host.sockets`)."""
        return self.host.sockets(proto)

    @property
    def ns_path(self) -> str:
        """``nsenter --net=PATH`` enters this end's host (:attr:`Host.ns_path`)."""
        return self.host.ns_path

    @property
    def pid(self) -> int:
        """A process in this end's host, for ``nsenter -t PID -n`` (:attr:`Host.pid`)."""
        return self.host.pid

    # -- GSO super-packets (the scripted peer's send(gso_size=)) ---------------------------
    def inject_gso(self, packet: Any, gso_size: int) -> Packet:
        """Write a TCP ``packet`` longer than the MTU as one GSO super-packet that the kernel
        receives whole, cut into ``gso_size``-byte segments only in name (``gso_size``
        in the virtio-net header, as a NIC's GRO hands a merged segment up, and as
        packetdrill's ``--mss`` writes it). ``gso_size=0``: one packet of any protocol,
        however long, with no GSO at all (a TUN device takes up to 64 KiB whatever its
        MTU, and packetdrill's inbound segments rely on it). Needs the pair's ``offload``
        option (the devices' virtio-net header)."""
        from .._wire import gso as _gso
        from .._wire import headers as _h
        from .._wire.numbers import IPPROTO_TCP

        data = to_bytes(packet, what=f"{self.name}.inject_gso()")
        if isinstance(gso_size, bool) or not isinstance(gso_size, int) or not 0 <= gso_size < 65536:
            raise ValueError(
                f"gso_size={gso_size!r}: give the segment size, 1-65535 bytes (0: no GSO)"
            )
        validate_frame(data, mode=self.mode, mtu=0xFFFF)
        f = _h.parse(data, 0, self.mode)
        if not gso_size:
            kind = _gso.VIRTIO_NET_HDR_GSO_NONE
        elif f[_h.IP_PROTO] != IPPROTO_TCP or f[_h.TCP_FLAGS] is None:
            raise ValueError("a GSO super-packet must be one TCP segment (gso_size applies to TCP)")
        elif f[_h.VERSION] == 4:
            kind = _gso.VIRTIO_NET_HDR_GSO_TCPV4
        else:
            kind = _gso.VIRTIO_NET_HDR_GSO_TCPV6
        vnet = _gso.VIRTIO_NET_HDR.pack(0, kind, 0, gso_size, 0, 0)
        if self._device.fd is None:
            raise TunDeviceError(f"{self.name} is closed", device=self.name)
        try:
            return self._relay.write(self._side, data, vnet_hdr=vnet)
        except OSError as exc:
            raise TunDeviceError(
                f"{self.name}: writing the GSO super-packet failed: {exc}", device=self.name
            ) from exc

    def __repr__(self) -> str:
        mac = f" mac={self.mac}" if self.mac else ""
        return f"<Endpoint {self.name}{mac} ip={self.ip} ip6={self.ip6} mtu={self.mtu}>"
