"""Harvest: stream a corpus through an LLM into a multi-layer Zarr activation cache."""
