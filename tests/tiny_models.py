"""Tiny random-weight models and a small trained tokenizer, built offline for fast tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

VOCAB = 512


def tiny_tokenizer():
    """A byte-level BPE trained in a second on the built-in corpus, with <bos>/<eos>/<pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from routesae.harvest.corpus import builtin_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(itertools.islice(builtin_documents(), 40), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(kind: str, n_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        raise ValueError(kind)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny(kind: str, folder: Path, n_layers: int = 4) -> Path:
    """A tiny model and tokenizer saved as a local transformers folder that harvest can load."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(kind, n_layers).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_store_with_saes(root: Path, archs: list[str], tokens: int = 4096) -> Path:
    """A tiny Llama under root/model, a store of all its layers (contexts of 32) at root/s.zarr, and
    SAEs of `archs` (k 8, 64 latents; single-layer ones at layer 3, multi-layer ones over 1..3)
    trained from it into root/runs. -> the model folder."""
    from routesae.harvest.run import HarvestConfig, run_harvest
    from routesae.train.config import FitConfig
    from routesae.train.trainer import fit

    model_dir = save_tiny("llama", root / "model")
    run_harvest(HarvestConfig(out=str(root / "s.zarr"), model=str(model_dir), dataset="builtin", tokens=tokens,
                              layers="all", context_len=32, batch_size=8, progress=False, min_chunk_bytes=1024))
    fit(FitConfig(cache=str(root / "s.zarr"), out=str(root / "runs"), archs=archs, ks=[8], latents=64, batch_size=256,
                  eval_tokens=0.25, layer=3, routed_layers=[1, 2, 3], progress=False, tokens=tokens))
    return model_dir
