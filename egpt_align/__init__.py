"""egpt_align: hidden-state draft adapters for speculative decoding, in JAX."""

__version__ = "0.1.0"
