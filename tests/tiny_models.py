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


# --- one tiny model per family routesae claims (tests/test_model_families.py) ----------------------
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "gpt2", "gpt_neox")
"""Families with a tiny random-weight model from `family_model`: transformers model types."""
FAMILY_SPECIALS: dict[str, tuple[str | None, str, str | None]] = {
    "llama": ("<bos>", "<eos>", None),  # Llama 3: no pad token
    "mistral": ("<bos>", "<eos>", None),
    "qwen2": (None, "<eos>", "<pad>"),  # Qwen: no BOS at all
    "qwen3": (None, "<eos>", "<pad>"),
    "gemma": ("<bos>", "<eos>", "<pad>"),
    "gemma2": ("<bos>", "<eos>", "<pad>"),
    "gemma3": ("<bos>", "<eos>", "<pad>"),
    "phi3": ("<bos>", "<eos>", "<eos>"),  # Phi-3 pads with its EOS
    "olmo2": ("<eos>", "<eos>", "<pad>"),  # OLMo 2: one <|endoftext|> is both BOS and EOS
    "gpt2": ("<eos>", "<eos>", None),  # GPT-2: <|endoftext|> is BOS and EOS, no pad
    "gpt_neox": ("<eos>", "<eos>", None),
}
"""(bos, eos, pad) of each family's tokenizer as its real checkpoints configure it, in the tiny
tokenizer's tokens (<pad> 0, <bos> 1, <eos> 2); None where the family has none."""
SPECIAL_IDS = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
FAMILY_WIDTH = 64
FAMILY_WINDOW = 8
"""Sliding window of the families that have one: shorter than the tests' contexts, so it matters."""


def _family_ids(family: str) -> dict[str, int | None]:
    bos, eos, pad = FAMILY_SPECIALS[family]
    return {"bos_token_id": SPECIAL_IDS.get(bos), "eos_token_id": SPECIAL_IDS[eos],
            "pad_token_id": SPECIAL_IDS.get(pad)}


def family_config(family: str, n_layers: int = 3):
    """The transformers config of a tiny `family` model: width 64, 4 heads (2 KV heads where the
    family has GQA), head_dim 16, `n_layers` blocks, the tiny tokenizer's vocabulary and special ids."""
    import transformers

    ids = _family_ids(family)
    d, ff, heads = FAMILY_WIDTH, 2 * FAMILY_WIDTH, 4
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=d, n_layer=n_layers, n_head=heads, n_positions=256,
                                       **ids)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=ff,
                                          num_hidden_layers=n_layers, num_attention_heads=heads,
                                          max_position_embeddings=256, **ids)
    common = dict(vocab_size=VOCAB, hidden_size=d, intermediate_size=ff, num_hidden_layers=n_layers,
                  num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256, **ids)
    head = dict(head_dim=d // heads)
    # alternating local / global attention, starting local, as Gemma 2 does (Gemma 3: 5 local to 1 global)
    types = dict(layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)])
    made = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=FAMILY_WINDOW),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common, **head),
        "gemma": lambda: transformers.GemmaConfig(**common, **head),
        "gemma2": lambda: transformers.Gemma2Config(**common, **head, **types, sliding_window=FAMILY_WINDOW,
                                                    query_pre_attn_scalar=d // heads),
        "gemma3": lambda: transformers.Gemma3TextConfig(**common, **head, **types, sliding_window=FAMILY_WINDOW,
                                                        query_pre_attn_scalar=d // heads),
        "phi3": lambda: transformers.Phi3Config(**common),
        "olmo2": lambda: transformers.Olmo2Config(**common),
    }
    if family not in made:
        raise ValueError(family)
    return made[family]()


def family_model(family: str, n_layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM of `family` (one of FAMILIES), float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, n_layers)).eval()
    # Norms start at their identity (weight 1, or 0 where the family adds 1): random ones make the
    # test see each norm's weight, as a trained model's are never the identity.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


_BASE_TOKENIZER: list[str] = []


def family_tokenizer(family: str):
    """The tiny tokenizer with `family`'s special tokens (FAMILY_SPECIALS); trained once per process."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not _BASE_TOKENIZER:
        _BASE_TOKENIZER.append(tiny_tokenizer().backend_tokenizer.to_str())
    bos, eos, pad = FAMILY_SPECIALS[family]
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_BASE_TOKENIZER[0]),
                                   **{k: v for k, v in named.items() if v is not None})


def save_family(family: str, folder: Path, n_layers: int = 3) -> Path:
    """A tiny `family` model and its tokenizer saved as a local transformers folder (float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    family_model(family, n_layers).save_pretrained(folder)
    family_tokenizer(family).save_pretrained(folder)
    return folder
