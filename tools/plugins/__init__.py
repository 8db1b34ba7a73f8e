"""Backend plugins for models that transformers does not load by itself.

Each module offers a factory for `tools.lib.backends.load_backend`, e.g.
`--draft tools.plugins.eventgpt:make_backend:CKPT` (see docs/PLUGINS.md).
"""
