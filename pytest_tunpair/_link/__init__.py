"""The link: the relay loop, a direction's stages, queue, impairments and rules."""
