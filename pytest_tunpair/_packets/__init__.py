"""Packets for assertions: the Packet record, the capture, matching, flows, pcap, plots."""
