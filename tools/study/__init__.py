"""The staged, resumable study of a pair: `python -m tools.study`."""
