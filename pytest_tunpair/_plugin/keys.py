"""Where the plugin keeps its state: ``pytest.StashKey``s on the config (the run) and on
items (one test), as pytest's logging and tmp_path plugins do."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .._factory import FactoryCheckpoint, TunPairFactory
    from .._kernel.netns import Visit
    from .._kernel.spare import SparePool
    from .._kernel.userns import Status
    from .options import PluginOptions
    from .threads import TestThreads

# -- the run (config.stash) ---------------------------------------------------------------------
#: The plugin's options, resolved (``options.resolve``).
OPTIONS: pytest.StashKey[PluginOptions] = pytest.StashKey()
#: How tunnels run in this process; set with --tunpair only.
USERNS: pytest.StashKey[Status] = pytest.StashKey()
#: Why this run cannot create tunnels (``PrivilegeError``'s message); set with --tunpair only.
REFUSAL: pytest.StashKey[str] = pytest.StashKey()
#: The inode of the network namespace tests start in.
HOME: pytest.StashKey[int] = pytest.StashKey()
#: The open module and session factories, by scope key.
SCOPED: pytest.StashKey[dict[str, TunPairFactory]] = pytest.StashKey()
#: The one contextvars.Context the tunnel tests run in when they run on threads of their own.
CONTEXT: pytest.StashKey[contextvars.Context] = pytest.StashKey()
#: The running test's stays in namespaces, left after its teardown.
VISITS: pytest.StashKey[list[Visit]] = pytest.StashKey()
#: The next tunnel test's namespace and devices, being built (``spares.py``).
SPARES: pytest.StashKey[SparePool] = pytest.StashKey()
#: pcap file stem -> test id, so that two ids never share a file.
PCAP_STEMS: pytest.StashKey[dict[str, str]] = pytest.StashKey()
#: pcap or plot file -> why it was not written (the terminal summary).
PCAP_ERRORS: pytest.StashKey[dict[str, str]] = pytest.StashKey()

# -- one test (item.stash) ----------------------------------------------------------------------
#: Its tun_pair_factory.
FACTORY: pytest.StashKey[TunPairFactory] = pytest.StashKey()
#: Its module or session factory, and where its own part began.
CHECKPOINT: pytest.StashKey[tuple[TunPairFactory, FactoryCheckpoint]] = pytest.StashKey()
#: Its packet trace is in a report already.
REPORTED: pytest.StashKey[bool] = pytest.StashKey()
#: The pcap files named in its report.
PCAP_FILES: pytest.StashKey[list[Path]] = pytest.StashKey()
#: Its namespace's threads and pools (``threads.begin`` to ``threads.leftovers``).
THREADS: pytest.StashKey[TestThreads] = pytest.StashKey()
