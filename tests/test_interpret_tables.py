"""The contexts pass's per-latent tables, batch by batch, against brute force over all the tokens
at once, written here from the definitions (formats.md)."""

from __future__ import annotations

import numpy as np
import torch

from routesae.interpret.tables import Batch, NegativeTable, PaperTable, SampleTable, TopTable, sorted_code
from routesae.interpret.windows import segments, sentence_bounds, window_bounds

CTX, N_LAT, LEFT, RIGHT = 32, 12, 3, 2


def _world(seed=0, n_ctx=12):
    """Random sparse codes over n_ctx contexts: BOS first, a few EOS inside; some latents dense,
    some rare, ties absent."""
    g = np.random.default_rng(seed)
    n = n_ctx * CTX
    special = np.zeros(n, bool)
    special[::CTX] = True
    special[g.choice(n, n // 10, replace=False)] = True
    rate = np.linspace(0.02, 0.6, N_LAT)
    fire = (g.random((n, N_LAT)) < rate) & ~special[:, None]
    z = np.where(fire, g.random((n, N_LAT)) * 30, 0.0).astype(np.float32)
    token_ids = g.integers(0, 20, n)
    return z, special, token_ids


def _brute_segments(special):
    n = len(special)
    first, end = np.zeros(n, int), np.zeros(n, int)
    for t in range(n):
        c0 = t // CTX * CTX
        a = t
        while a > c0 and not special[a - 1]:
            a -= 1
        b = t + 1
        while b < c0 + CTX and not special[b]:
            b += 1
        first[t], end[t] = a, b
    return first, end


def _batches(z, special, token_ids, per_batch=4):
    step = per_batch * CTX
    for a in range(0, len(z), step):
        zb = torch.from_numpy(z[a:a + step])
        sp = torch.from_numpy(special[a:a + step])
        first, end = segments(sp, CTX)
        rows, lat = zb.nonzero(as_tuple=True)
        ws, we = window_bounds(torch.arange(len(zb)), first, end, LEFT, RIGHT)
        yield Batch(a, rows, lat, zb[rows, lat], torch.full_like(lat, -1), ws, we,
                    *sorted_code(rows, lat, zb[rows, lat], len(zb))), torch.from_numpy(
            token_ids[a:a + step]), sp


def test_segments_equal_a_loop_over_tokens():
    _, special, _ = _world()
    first, end = segments(torch.from_numpy(special), CTX)
    bf, be = _brute_segments(special)
    keep = ~special
    assert (first.numpy()[keep] == bf[keep]).all() and (end.numpy()[keep] == be[keep]).all()


def test_top_table_is_the_global_greedy_non_overlapping_top_n():
    z, special, token_ids = _world()
    top = TopTable(N_LAT, 5, LEFT + RIGHT + 1)
    for batch, _, _ in _batches(z, special, token_ids):
        top.add(batch)
    bf, be = _brute_segments(special)
    for lat in range(N_LAT):
        cand = sorted(((float(z[t, lat]), t) for t in np.nonzero(z[:, lat])[0]), key=lambda p: (-p[0], p[1]))
        kept = []
        for v, t in cand:
            w = (max(t - LEFT, bf[t]), min(t + RIGHT + 1, be[t]))
            if all(not (w[0] < b and a < w[1]) for _, _, (a, b) in kept):
                kept.append((v, t, w))
            if len(kept) == 5:
                break
        cols = [int(c) for c in top.ordered()[lat] if top.score[lat, c] > float("-inf")]
        got = [(float(top.value[lat, c]), int(top.token[lat, c]), (int(top.start[lat, c]), int(top.stop[lat, c])))
               for c in cols]
        assert got == kept, lat
        for c, (_, t, (a, b)) in zip(cols, kept):  # the shading: the latent's code over the window
            np.testing.assert_allclose(top.acts[lat, c, : b - a].float().numpy(), z[a:b, lat], rtol=1e-3)
            assert top.acts[lat, c, b - a:].abs().sum() == 0


def test_sample_table_holds_real_activations_and_draws_evenly():
    z, special, token_ids = _world(1, n_ctx=40)
    counts = np.zeros(len(z))
    for rep in range(30):
        sample = SampleTable(N_LAT, 8, LEFT + RIGHT + 1, torch.Generator().manual_seed(rep))
        for batch, _, _ in _batches(z, special, token_ids):
            sample.add(batch)
        for lat in range(N_LAT):
            cols = [c for c in range(8) if sample.score[lat, c] < float("inf")]
            assert len(cols) == min(8, int((z[:, lat] > 0).sum()))
            toks = [int(sample.token[lat, c]) for c in cols]
            assert len(set(toks)) == len(toks)
            for c, t in zip(cols, toks):
                assert float(sample.value[lat, c]) == z[t, lat] > 0
        counts += np.bincount(sample.token[N_LAT - 1].numpy(), minlength=len(z))
    # the densest latent: each of its tokens drawn about 30 * 8 / n_fired times, early and late alike
    fired = np.nonzero(z[:, N_LAT - 1])[0]
    half = len(fired) // 2
    assert abs(counts[fired[:half]].sum() - counts[fired[half:]].sum()) < 0.25 * counts[fired].sum()


def test_negative_windows_are_zero_throughout_and_within_one_document():
    z, special, token_ids = _world(2)
    neg = NegativeTable(N_LAT, 6, 16, torch.Generator().manual_seed(0))
    for batch, _, sp in _batches(z, special, token_ids):
        neg.add(batch, (~sp).nonzero().squeeze(1))
    found = 0
    for lat in range(N_LAT):
        for c in range(6):
            if neg.key[lat, c] == float("inf"):
                continue
            a, b = int(neg.start[lat, c]), int(neg.stop[lat, c])
            found += 1
            assert b > a and (z[a:b, lat] == 0).all() and not special[a:b].any() and a // CTX == (b - 1) // CTX
    assert found >= N_LAT * 3


def test_paper_table_equals_the_rule_applied_to_all_tokens():
    z, special, token_ids = _world(3)
    canon = torch.tensor([i % 7 for i in range(20)])  # 20 token ids, 7 "lower-cased" groups
    table = PaperTable(N_LAT, canon, threshold=12.0, per_token=2, max_distinct=5)
    for batch, ids, _ in _batches(z, special, token_ids):
        table.add(batch, ids)
    for lat in range(N_LAT):
        groups: dict[int, list[tuple[float, int]]] = {}
        for t in np.nonzero(z[:, lat] > 12.0)[0]:
            groups.setdefault(int(canon[token_ids[t]]), []).append((float(z[t, lat]), int(t)))
        dropped = len(groups) > 5
        assert bool(table.dropped[lat]) == dropped
        assert int(table.distinct[lat]) == min(len(groups), 6)
        if dropped:
            assert not ((table.key // table.n_canon) == lat).any()
            continue
        want = sorted((p for g in groups.values() for p in sorted(g, key=lambda p: -p[0])[:2]), key=lambda p: -p[0])
        mine = (table.key // table.n_canon) == lat
        got = sorted(zip(table.value[mine].tolist(), table.token[mine].tolist()), key=lambda p: -p[0])
        assert got == want


def test_sentence_bounds_stop_at_sentence_ends_and_specials():
    vocab_ends = np.array([False, True, False])  # token 1 ends a sentence
    ids = np.array([0, 0, 1, 0, 0, 0, 1, 0, 0])
    special = np.zeros(9, bool)
    assert sentence_bounds(ids, special, 4, vocab_ends, 32) == (3, 7)  # after the '.', through the next
    special[4] = True
    assert sentence_bounds(ids, special, 5, vocab_ends, 32) == (5, 7)
    long = np.zeros(200, int)
    assert sentence_bounds(long, np.zeros(200, bool), 100, vocab_ends, 32) == (68, 132)
