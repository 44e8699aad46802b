"""Hosts: the only code that knows a diffusion host's internals and fills the
core's attention store from it."""
