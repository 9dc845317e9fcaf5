"""The harvest's defaults that its command line shows, apart from the code behind them, so
`routesae harvest --help` loads no torch."""

DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
"""The paper's model."""
DEFAULT_DATASET = "segyges/OpenWebText2"
"""The paper's corpus (streamed from the hub)."""
