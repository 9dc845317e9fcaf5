"""The loader: every non-special training token once per epoch, none of the held-out tail,
shuffled at the token level, the same for the same seed, resumable, memory bounded."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from routesae import Cache
from routesae.errors import RouteSAEError
from routesae.train.data import WORKERS, ChunkLoader, Position, TokenSplit, can_map
from synthetic_store import make_store

D = 8
CTX = 16


def id_acts(layer_pos: int, start: int, stop: int) -> np.ndarray:
    """Columns 0 and 2: the token's index in the store as t // 128, t % 128 (exact in bf16);
    column 1: the layer's position."""
    out = np.zeros((stop - start, D), dtype=np.float32)
    t = np.arange(start, stop)
    out[:, 0], out[:, 2] = t // 128, t % 128
    out[:, 1] = layer_pos
    return out


def token_ids(acts: torch.Tensor) -> torch.Tensor:
    """[n, n_layers, D] -> the store index of each row (read from the first layer)."""
    a = acts[:, 0].float()
    return (a[:, 0] * 128 + a[:, 2]).long()


# uncompressed stores are read by scattered reads from the shard files, compressed ones by zarr;
# uncompressed ones whose chunks fill whole pages (16 contexts x 16 tokens x 16 bytes) can be mapped
@pytest.fixture(scope="module", params=[("float32", "none", 2), ("bfloat16", "none", 2), ("bfloat16", "blosc-zstd", 2),
                                        ("bfloat16", "none", 16)])
def cache(request, tmp_path_factory):
    dtype, compression, chunk_contexts = request.param
    return make_store(tmp_path_factory.mktemp("data") / "s.zarr", 1600, d_model=D, layers=[2, 3, 4],
                      n_model_layers=8, context_len=CTX, chunk_contexts=chunk_contexts, acts_fn=id_acts,
                      storage_dtype=dtype, compression=compression)


@pytest.fixture(params=["process", "mapped"])
def workers(request, cache):
    """The loader process, and the mapped loader on the stores that allow it."""
    if request.param == "mapped" and not can_map(cache, cache.layers):
        pytest.skip("this store cannot be mapped")
    return request.param


def epoch_ids(loader: ChunkLoader, epoch: int, start: Position | None = None) -> tuple[list[int], list[int]]:
    """Token ids served in `epoch` (from `start`), and the batch sizes."""
    ids, sizes = [], []
    for batch in loader.batches(start or Position(epoch, 0)):
        if batch.position.epoch != epoch:
            break
        # mapped batches come converted to float32, the others in the storage dtype
        stored = loader.cache.acts_stored(loader.layers[0], 0, 1).dtype
        assert batch.acts.dtype == (torch.float32 if loader.workers == "mapped" else stored)
        acts = batch.acts.float()
        assert (acts[:, :, [0, 2]] == acts[:, :1, [0, 2]]).all(), "the layers of a row are not the same token"
        store_pos = torch.tensor([loader.cache.layers.index(x) for x in loader.layers]).float()
        assert (acts[:, :, 1] == store_pos).all()
        ids += token_ids(acts).tolist()
        sizes.append(acts.shape[0])
        if batch.position.offset == loader.epoch_tokens:
            break
    return ids, sizes


def test_split_is_chunk_aligned_and_holds_out_the_tail(cache):
    split = TokenSplit.of(cache, 0.1)
    assert split.train_stop % cache.layout.chunk_tokens == 0
    assert cache.n_tokens - split.train_stop >= 160
    assert split.eval_range == (split.train_stop, 1600)
    assert TokenSplit.of(cache, 0).train_stop == 1600
    assert TokenSplit.of(cache, 320).train_stop == 1280
    with pytest.raises(RouteSAEError, match="nothing to train on"):
        TokenSplit.of(cache, 1590)


def test_every_non_special_training_token_once_per_epoch_shuffled(cache, workers):
    split = TokenSplit.of(cache, 0.1)
    buffer_tokens = max(96, 2 * cache.layout.chunk_tokens)  # buffers of several chunks
    loader = ChunkLoader(cache, [2, 3, 4], split, batch_size=40, buffer_tokens=buffer_tokens, seed=7, workers=workers)
    special = cache.special(0, split.train_stop).numpy()
    want = sorted(int(t) for t in np.flatnonzero(~special))
    assert loader.epoch_tokens == len(want)

    ids0, sizes = epoch_ids(loader, 0)
    assert sorted(ids0) == want  # each exactly once, none held out, no special token
    assert max(ids0) < split.train_stop
    assert all(s == 40 for s in sizes[:-1]) and 0 < sizes[-1] <= 40 and sum(sizes) == len(want)
    # shuffled at the token level: neighbours in a batch are rarely neighbours in the store,
    # and one batch mixes tokens of several chunks
    consecutive = np.mean(np.diff(ids0) == 1)
    assert consecutive < 0.1
    chunks_in_first_batch = {t // cache.layout.chunk_tokens for t in ids0[:40]}
    assert len(chunks_in_first_batch) >= 2

    ids1, _ = epoch_ids(loader, 1)
    assert sorted(ids1) == want and ids1 != ids0  # the next epoch is shuffled afresh


def test_same_seed_same_batches_other_seed_other_order(cache):
    split = TokenSplit.of(cache, 0.1)
    a = epoch_ids(ChunkLoader(cache, [3], split, 40, 96, seed=1), 0)[0]
    b = epoch_ids(ChunkLoader(cache, [3], split, 40, 96, seed=1), 0)[0]
    c = epoch_ids(ChunkLoader(cache, [3], split, 40, 96, seed=2), 0)[0]
    assert a == b and a != c
    # the layers read do not change the order (SAEs on other layers see the same tokens)
    assert epoch_ids(ChunkLoader(cache, [2, 4], split, 40, 96, seed=1), 0)[0] == a


def test_resume_from_a_position_serves_the_rest(cache, workers):
    split = TokenSplit.of(cache, 0.1)
    loader = ChunkLoader(cache, [2, 4], split, 40, 96, seed=3, workers=workers)
    full = []
    positions = []
    for batch in loader.batches():
        full.append(token_ids(batch.acts).tolist())
        positions.append(batch.position)
        if len(full) == 60:  # past the end of the first epoch (~36 batches)
            break
    for cut in (5, 17, len(positions) - 30):
        rest = []
        for batch in loader.batches(positions[cut - 1]):
            rest.append(token_ids(batch.acts).tolist())
            if len(rest) == 60 - cut:
                break
        assert rest == full[cut:]


def test_special_tokens_kept_on_request(cache):
    split = TokenSplit.of(cache, 0)
    loader = ChunkLoader(cache, [2], split, 64, 96, seed=0, include_special=True)
    assert sorted(epoch_ids(loader, 0)[0]) == list(range(1600))


def test_at_most_two_buffers_alive(cache):
    split = TokenSplit.of(cache, 0)
    loader = ChunkLoader(cache, [2, 3, 4], split, 16, 64, seed=0, workers="thread")
    alive: list[weakref.ref] = []
    load = loader.load_buffer

    def tracked(*args):
        buf = load(*args)
        alive.append(weakref.ref(buf))
        return buf

    loader.load_buffer = tracked
    most = 0
    for i, batch in enumerate(loader.batches()):
        del batch
        most = max(most, sum(r() is not None for r in alive))
        if i == 150:
            break
    assert len(alive) > 10 and most <= 2


def test_missing_layer_is_refused(cache):
    with pytest.raises(RouteSAEError, match="layer 9 is not in the store"):
        ChunkLoader(cache, [9], TokenSplit.of(cache, 0.1), 40, 96, seed=0)


def test_every_loader_serves_the_same_batches(cache):
    split = TokenSplit.of(cache, 0.1)
    kinds = [w for w in WORKERS if w != "mapped" or can_map(cache, [2, 4])]
    served = {}
    for workers in kinds:
        # buffers of several chunks, so batches span buffers and chunks
        loader = ChunkLoader(cache, [2, 4], split, 40, 3 * cache.layout.chunk_tokens, seed=5, workers=workers)
        batches = []
        for batch in loader.batches(Position(0, 120)):
            batches.append((batch.acts.clone(), batch.position))
            if len(batches) == 50:
                break
        served[workers] = batches
    for workers in kinds[1:]:
        for (a, pa), (b, pb) in zip(served["process"], served[workers]):
            assert torch.equal(a.float(), b.float()) and pa == pb


def test_mapped_buffers_are_released_and_never_write_the_store(tmp_path):
    import gc

    from routesae.train.mapped import MappedBuffer

    cache = make_store(tmp_path / "s.zarr", 1600, d_model=D, layers=[2, 3, 4], n_model_layers=8, context_len=CTX,
                       chunk_contexts=16, acts_fn=id_acts, storage_dtype="bfloat16", compression="none")
    loader = ChunkLoader(cache, [2, 3, 4], TokenSplit.of(cache, 0), 16, 256, seed=0, workers="mapped")
    before = cache.acts_stored(3, 0, 1600).clone()
    created: list[weakref.ref] = []
    init = MappedBuffer.__init__

    def tracked(self, *args, **kw):
        init(self, *args, **kw)
        self.region[:, :5] = 7  # a stray write lands in a private copy of the page
        created.append(weakref.ref(self))

    MappedBuffer.__init__ = tracked
    try:
        most = 0
        for i, batch in enumerate(loader.batches()):
            del batch  # no gc.collect() per batch: regions are closed, not collected (and in a full
            # suite's heap each collect took ~0.4 s)
            most = max(most, sum(r() is not None and r().region is not None for r in created))
            if i == 250:
                break
    finally:
        MappedBuffer.__init__ = init
    gc.collect()
    assert len(created) > 10 and most <= 2
    assert all(r() is None or r().region is None for r in created)  # closed when the loader stopped
    assert torch.equal(Cache.open(cache.path).acts_stored(3, 0, 1600), before)


def test_process_slots_hold_two_buffers_only(cache):
    from routesae.train.prefetch import ProcessPrefetcher

    loader = ChunkLoader(cache, [2, 3, 4], TokenSplit.of(cache, 0), 16, 64, seed=0)
    slots = ProcessPrefetcher.allocate_slots(loader)
    assert len(slots) == 2 and all(s.shape == (3, loader.buffer_capacity, D) and s.is_shared() for s in slots)
