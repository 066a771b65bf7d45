"""Backends, installed as `trmlx.backends`: one sub-package per framework, imported only when chosen."""
