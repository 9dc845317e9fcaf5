"""The fit's CUDA branches that do not need a GPU to run, forced onto the CPU: the staged (pinned,
on CUDA) copy of each batch, the loader process a GPU fit uses, the dtype and loader 'auto' picks
on CUDA, and the torchrun checks of a CUDA rank. What stays GPU-only is listed in selftest/run.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import routesae.train.trainer as trainer_module
from routesae import Cache
from routesae.errors import RouteSAEError
from routesae.model.compute_dtype import native_on
from routesae.ranks import Ranks
from routesae.train import distributed
from routesae.train.config import FitConfig
from routesae.train.data import ChunkLoader, TokenSplit
from routesae.train.device_feed import DeviceFeed
from routesae.train.trainer import fit, plan_fit, resolve_compute_dtype, resolve_loader
from synthetic_store import make_store

D = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "s.zarr"
    make_store(path, 4096, d_model=D, layers=list(range(9)), n_model_layers=8, chunk_contexts=8,
               storage_dtype="bfloat16", compression="none")
    return path


def cfg(store, out, **kw) -> FitConfig:
    base = dict(cache=str(store), out=str(out), archs=["topk", "routesae"], ks=[8], latents=64, batch_size=100,
                buffer_tokens=512, progress=False, log_every=5, tokens=1650)
    return FitConfig(**{**base, **kw})


def test_staged_feed_hands_over_the_loaders_batches_unchanged_and_owned(store):
    """Every batch of a loader process (strided views into shared memory, a short last batch of
    the epoch) comes out of the staging path equal, in the loader's layout, and stays intact while
    the staging tensors and the loader's buffers are reused under it."""
    cache = Cache.open(store)
    split = TokenSplit.of(cache, 0.05)
    loader = ChunkLoader(cache, [2, 4, 6], split, 96, 512, seed=3, workers="process")
    assert loader.epoch_tokens % 96, "the epoch should end in a short batch"
    feed = DeviceFeed(torch.device("cpu"), staged=True)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in loader.batches():
        got = feed(batch.acts)
        assert got.shape == batch.acts.shape and got.dtype == batch.acts.dtype == torch.bfloat16
        assert got.transpose(0, 1).is_contiguous()  # layer-major, as the loader's views into its buffer are
        assert torch.equal(got, batch.acts)
        kept.append((got, batch.acts.clone()))
        if batch.position.offset == loader.epoch_tokens:
            break
    sizes = {g.shape[0] for g, _ in kept}
    assert 96 in sizes and len(sizes) == 2
    assert feed.staged_batches == len(kept) > 2 * 2  # the two staging slots were each reused
    for got, want in kept:  # nothing handed out was a view of a reused staging slot or loader buffer
        assert torch.equal(got, want)


def test_staged_feed_follows_a_change_of_dtype_and_size():
    feed = DeviceFeed(torch.device("cpu"), staged=True)
    a = torch.randn(5, 2, 3)
    b = torch.randn(2, 4, 7, dtype=torch.float64)[:, 1:3].transpose(0, 1).contiguous().transpose(0, 1)
    c = torch.randn(9, 3, 2).to(torch.bfloat16)
    for x in (a, b, c, a[:2], c):
        y = feed(x)
        assert y.dtype == x.dtype and torch.equal(y, x)


def test_plain_feed_on_the_cpu_is_the_batch_itself():
    x = torch.randn(4, 2, 3)
    feed = DeviceFeed(torch.device("cpu"))
    assert not feed.staged and feed(x) is x and feed.staged_batches == 0


def test_a_fit_through_the_staged_feed_trains_the_same_weights(store, tmp_path, monkeypatch):
    """The GPU's route for batches (loader process, staging) against the CPU's (mapped loader, no
    staging): the SAEs cannot tell them apart, bit for bit."""
    fit(cfg(store, tmp_path / "plain", loader="mapped"))
    staged = []

    def staged_feed(device):
        staged.append(DeviceFeed(device, staged=True))
        return staged[-1]

    monkeypatch.setattr(trainer_module, "DeviceFeed", staged_feed)
    fit(cfg(store, tmp_path / "staged", loader="process"))
    assert staged and staged[0].staged_batches == 17  # 1650 tokens in batches of 100
    for name in ("topk-k8", "routesae-k8"):
        ref, got = load_file(tmp_path / "plain" / name / "sae.safetensors"), load_file(tmp_path / "staged" / name / "sae.safetensors")
        assert all(torch.equal(ref[k], got[k]) for k in ref), name


def test_auto_picks_on_cuda_what_a_gpu_fit_needs(store, tmp_path, monkeypatch):
    """--dtype auto: bf16 where the GPU multiplies it natively (Ampere on), float32 before;
    --loader auto: the loader process (the mapped loader is for a CPU sharing its cores)."""
    cuda = torch.device("cuda")
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert resolve_compute_dtype("auto", cuda) == want
    assert resolve_compute_dtype("float32", cuda) == torch.float32
    plan = plan_fit(cfg(store, tmp_path / "x", device="cpu"))
    assert resolve_loader("auto", plan) == "mapped"
    plan.device = cuda
    assert resolve_loader("auto", plan) == "process"


def test_a_cuda_rank_without_its_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RouteSAEError, match="local rank 1.*has no GPU: this machine has 1"):
        distributed.from_env(torch.device("cuda"))
    with pytest.raises(RouteSAEError, match="LOCAL_RANK; give --device cuda, not cuda:1"):
        distributed.from_env(torch.device("cuda", 1))



def test_each_torchrun_rank_takes_its_own_gpu_for_harvest_and_fit(monkeypatch):
    """The same `--device cuda` on every rank means GPU LOCAL_RANK (harvest once loaded every rank
    onto GPU 0); alone, a device is as asked."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rank = Ranks(rank=5, world_size=8, local_rank=1)
    for asked in ("auto", "cuda", "cuda:0"):
        assert rank.device(asked) == "cuda:1"
    assert rank.device("cpu") == "cpu"
    with pytest.raises(RouteSAEError, match="give --device cuda, not cuda:2"):
        rank.device("cuda:2")
    assert Ranks().device("cuda:2") == "cuda:2" and Ranks().device("auto") == "auto"
    with pytest.raises(RouteSAEError, match="local rank 6.*has no GPU: this machine has 4"):
        Ranks(rank=6, world_size=8, local_rank=6).device("cuda")


def test_native_bf16_is_asked_of_the_gpu_named(monkeypatch):
    """torch answers for the current GPU: native_on makes the GPU asked about current first."""
    current = []

    class Device:
        def __init__(self, device):
            self.index = device.index

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: current[-1:] == [1])
    assert native_on("bfloat16", torch.device("cuda", 1))
    assert not native_on("bfloat16", torch.device("cuda", 0))
