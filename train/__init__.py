"""Fit: train SAEs (TopK, RouteSAE, ...) from the activation cache, never running the LLM."""
