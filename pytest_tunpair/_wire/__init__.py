"""Packet bytes: the one header parser and the builders. Imports nothing above it."""
