"""pytest-tunpair."""
