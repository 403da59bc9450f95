"""A TunPair without pytest: `python examples/standalone.py` as root (or `unshare -Urn`)."""

# --8<-- [start:standalone]
import subprocess

from pytest_tunpair import TunPair

with TunPair(ipv6=None) as pair:  # the calling thread enters a fresh namespace
    subprocess.run(["ping", "-c1", pair.b.ip], check=True, capture_output=True)
    print(pair.packets.summary())
# back in the original namespace; devices and namespace are gone
# --8<-- [end:standalone]
