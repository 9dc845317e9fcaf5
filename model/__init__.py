"""The LLM, shared by every stage that runs it: loading it and its tokenizer (`loading`), and
hooks on its residual stream (`hooks`)."""
