"""The values eval's command line offers, apart from the code behind them, so `routesae eval
--help` loads no torch."""

BASELINES = ("uniform", "random-layer")
"""Routing baselines scored beside a RouteSAE: every layer weighted alike, and a random layer."""
