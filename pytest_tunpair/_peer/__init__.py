"""The scripted peer: the test plays one side packet by packet."""
