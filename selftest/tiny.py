"""The self-test's `--tiny` model: a random-weight Llama (width 64, 4 blocks) and a small byte-level
BPE trained on the built-in corpus, saved as a transformers folder every command can load."""

from __future__ import annotations

import itertools
from pathlib import Path

TINY_VOCAB = 512
"""The tokenizer's vocabulary: <pad> 0, <bos> 1, <eos> 2, then bytes and merges."""


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to `folder` (created); -> folder. Seconds on a CPU."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from routesae.harvest.corpus import builtin_documents
    from routesae.model.loading import quiet_loading

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        itertools.islice(builtin_documents(), 40),
        trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_loading():  # no "Writing model shards" bar on the self-test's stderr
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
