"""packetdrill scripts as tests: with ``--tunpair``, pytest collects ``*.pkt`` files.

Each file is a :class:`PktFile` whose items are its ``--ip_version`` variants
(``script.pkt::ipv4``, ``::ipv4-mapped-ipv6``, ``::ipv6``, as google/packetdrill's
run_all.py runs them; a script that sets ``--ip_version`` runs in that one, the
``tunpair_pkt_ip_versions`` ini key picks among them). An item is a test function over
``tun_pair_factory``, so it gets what every tunnel test gets: its own namespace (rootless
too), the packet trace in the report of a failure, pcap files with ``--tunpair-pcap``. The
script itself is played by ``_peer/pkt_run.py``; this module only fits it into pytest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import keys

if TYPE_CHECKING:
    from .._factory import TunPairFactory

__all__ = ["PktFile", "PktItem", "collect_file"]


def collect_file(file_path: Path, parent: pytest.Collector) -> PktFile | None:
    """``pytest_collect_file``: a ``.pkt`` file, when ``--tunpair`` is on and
    ``tunpair_no_pkt`` is not set."""
    if file_path.suffix != ".pkt":
        return None
    options = parent.config.stash[keys.OPTIONS]
    if not options.tunpair or options.tunpair_no_pkt:
        return None
    return PktFile.from_parent(parent, path=file_path)


class PktFile(pytest.File):
    """A packetdrill script: one item per ``--ip_version`` it runs in."""

    def collect(self) -> Iterator[pytest.Item]:
        from .._peer.pkt_parse import PktSyntaxError, read_options
        from .._peer.pkt_run import IP_VERSIONS

        options = self.config.stash[keys.OPTIONS]
        wanted = options.tunpair_pkt_ip_versions
        text = self.path.read_text(errors="replace")
        try:
            own = [v for n, v, _line in read_options(text) if n == "ip_version" and v]
        except PktSyntaxError:
            own = []  # the item says what is wrong when it runs
        versions = [v for v in IP_VERSIONS if v in wanted]
        if own:
            # A version this runner does not know still gets its item, which fails naming
            # the line: a typo must not leave the file with no test at all.
            versions = [v for v in own if v in wanted or v not in IP_VERSIONS]
        else:
            # run_all.py: a script named *v4.pkt runs over IPv4 only, *v6.pkt over IPv6.
            if self.path.name.endswith("v6.pkt"):
                versions = [v for v in versions if v == "ipv6"]
            elif self.path.name.endswith("v4.pkt"):
                versions = [v for v in versions if v != "ipv6"]
        for version in versions:
            yield PktItem.from_parent(self, name=version, callobj=_run_script, ip_version=version)


def _run_script(tun_pair_factory: TunPairFactory, request: pytest.FixtureRequest) -> None:
    item = request.node
    assert isinstance(item, PktItem)
    item.run_in(tun_pair_factory)


class PktItem(pytest.Function):
    """One run of a script: ``script.pkt::ipv4``."""

    def __init__(self, *args: Any, ip_version: str = "ipv4", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: packetdrill's ``--ip_version`` for this run.
        self.ip_version = ip_version

    def run_in(self, factory: TunPairFactory) -> None:
        from .._peer.pkt_run import Runner, load, pair_options

        __tracebackhide__ = True
        options = self.config.stash[keys.OPTIONS]
        text = self.path.read_text(errors="replace")
        shown = self.shown_path()
        script, config = load(
            text, self.ip_version, shown, slack_usecs=options.tunpair_pkt_slack_usecs
        )
        pair = factory.make(pair_options(config), source=str(self.path))
        peer = pair.script("b")
        runner = Runner(
            script,
            config,
            peer,
            path=shown,
            directory=str(self.path.parent),
            lines=text.splitlines(),
            netns_path=pair.netns_path,
            spawn=pair.spawn,
        )
        runner.run()

    def shown_path(self) -> str:
        """The script's path as messages show it: from the rootdir, as pytest's ids are."""
        try:
            return str(self.path.relative_to(self.config.rootpath))
        except ValueError:
            return str(self.path)

    def reportinfo(self) -> tuple[Path, int, str]:
        # The domain is the item's own name: a dotted one would read as a module path.
        return self.path, 0, self.name

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:  # type: ignore[override]
        from .._peer.pkt_parse import PktSyntaxError
        from .._peer.pkt_run import PktFailure, PktUnsupported

        exc = excinfo.value
        if isinstance(exc, PktFailure):
            return str(exc)
        if isinstance(exc, PktUnsupported):
            return (
                f"{exc}\n(pytest-tunpair's packetdrill runner cannot play this yet: the "
                "script fails rather than pass untested)"
            )
        if isinstance(exc, PktSyntaxError):
            return f"{self.shown_path()}:{exc.line}: {exc.message}"
        return super().repr_failure(excinfo)
