"""Eval: reconstruction metrics from the cache; splice metrics (KL, delta-CE, loss recovered) in the LLM."""
