"""Interpret: feature contexts, automated interpretation, steering and ablation (later issue)."""
