"""`torchrun --nproc-per-node 2 -m routesae fit` (two CPU ranks over gloo) trains the weights one
process trains on the same global batches, resumes after SIGKILL as one process does, and says in
one line what it cannot do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kill_points import SCRIPT as KILL_POINTS, start_paused
from synthetic_store import make_store

# Every architecture; RouteSAE is checked on its own below. Batches of 63 tokens: the two slices
# are uneven (32 + 31), and the last batch of the epoch is short.
ARCHS = "topk,batchtopk,matryoshka,vanilla,gated,jumprelu,mlsae,crosscoder,routesae"
LR = 5e-4


def fit_args(store, out, *extra: str) -> list[str]:
    return ["fit", "--cache", str(store), "--out", str(out), "--arch", ARCHS, "--k", "4", "--latents", "64",
            "--batch-size", "63", "--buffer-tokens", "256", "--dtype", "float32", "--auxk", "--dead-tokens", "300",
            "--log-every", "5", "--no-progress", *extra]


def single(store, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "routesae", *fit_args(store, out, *extra)]


def two_ranks(store, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "routesae", *fit_args(store, out, *extra)]


def two_ranks_paused(store, out, *extra: str) -> list[str]:
    """two_ranks under kill_points (each rank arms the point; see kill_points)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(KILL_POINTS), *fit_args(store, out, *extra)]


def env() -> dict[str, str]:
    # one thread per process in every run, as torchrun's workers get
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def rank_processes(agent: int) -> dict[int, int]:
    """RANK -> pid of the workers torchrun (pid `agent`) started."""
    ranks = {}
    for task in os.listdir(f"/proc/{agent}/task"):
        with open(f"/proc/{agent}/task/{task}/children") as fh:
            for pid in map(int, fh.read().split()):
                with open(f"/proc/{pid}/environ", "rb") as env_fh:
                    env = dict(item.split(b"=", 1) for item in env_fh.read().split(b"\0") if b"=" in item)
                if b"RANK" in env:
                    ranks[int(env[b"RANK"])] = pid
    return ranks


def wait_gone(pids: list[int], timeout: float = 300) -> None:
    """Until none of `pids` runs (not our children: their exit is seen in /proc)."""
    deadline = time.time() + timeout
    for pid in pids:
        while time.time() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"process {pid} still runs")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "s.zarr"
    make_store(path, 4096, d_model=16, layers=list(range(9)), n_model_layers=8, chunk_contexts=4)
    return path


def names() -> list[str]:
    return [f"{arch}-k4" for arch in ARCHS.split(",")]


def test_two_ranks_train_the_single_process_weights(store, tmp_path):
    run_ok(single(store, tmp_path / "one", "--epochs", "1"))
    r = run_ok(two_ranks(store, tmp_path / "two", "--epochs", "1"))
    # rank 0 alone reports: each SAE folder once on stdout, one summary line
    assert r.stdout.split() == [str(tmp_path / "two" / name) for name in names()]
    assert r.stderr.count("trained 9 SAE(s)") == 1

    # Measured (float32, 58 steps): every weight of the other architectures within 7e-7 of its
    # largest entry (max abs 2.4e-7: BatchTopK's W_dec, JumpReLU's threshold). RouteSAE's router
    # differs more (max abs 1.5e-4 of entries ~0.25), and through it its coder (6.6e-5 relative, b_dec):
    # at the start the router's gradient is float round-off alone (with b_dec = b_enc = 0 the loss
    # does not change with the routing weight p), which Adam's first steps blow up to about lr
    # whatever its size: another summation order, one process or two, gives another router.
    worst = {}
    for name in names():
        one = load_file(str(tmp_path / "one" / name / "sae.safetensors"))
        two = load_file(str(tmp_path / "two" / name / "sae.safetensors"))
        assert one.keys() == two.keys()
        for key in one:
            diff = float((one[key] - two[key]).abs().max())
            if key == "router.weight":
                assert diff < 2 * LR, (name, key, diff)
                continue
            rel = diff / float(one[key].abs().max().clamp_min(1e-12))
            worst[name, key] = rel
            assert rel < (1e-3 if name.startswith("routesae") else 1e-5), (name, key, diff, rel)
        config = json.loads((tmp_path / "two" / name / "config.json").read_text())
        assert config["training"]["world_size"] == 2
        # the logged means are the whole batch's: NormMSE, L0 and dead fraction as one process logs them
        rows = [[json.loads(line) for line in (tmp_path / d / name / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two")]
        assert len(rows[0]) == len(rows[1])
        for a, b in zip(*rows):
            assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
            for key in ("nmse", "l0", "dead_frac"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, a["step"], key)
    assert max(worst.values()) > 0  # two ranks sum in another order: equality would mean one rank did it all


def test_two_ranks_killed_then_rerun_give_the_uninterrupted_weights(store, tmp_path):
    extra = ("--epochs", "2", "--checkpoint-every", "7")
    run_ok(two_ranks(store, tmp_path / "clean", *extra))

    out = tmp_path / "killed"
    ckpt = out / "checkpoint.pt"
    # Kill right after a checkpoint, then three steps after one: first torchrun and both ranks at
    # once (a crash of the machine), then rank 0 alone, the one writing (torchrun then stops rank 1).
    # Rank 0 waits at the kill point (rank 1 for rank 0, in the next step's collective).
    for point, whole_run in (("checkpoint:1", True), ("after-checkpoint:1+3", False)):
        proc = start_paused(two_ranks_paused(store, out, *extra), point, tmp_path / "markers", env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ranks = rank_processes(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        for pid in [proc.pid, *ranks.values()] if whole_run else [ranks[0]]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        wait_gone(list(ranks.values()))  # torchrun's death does not end its ranks: only then rerun
    assert ckpt.exists() and not (out / "topk-k4" / "config.json").exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step == 14  # the first run's checkpoint at 7, the second's at 14 (killed at 17)
    said = [line for line in run_ok(two_ranks(store, out, *extra)).stderr.splitlines() if line.startswith("resuming")]
    assert len(said) == 1 and said[0].startswith(f"resuming {out} at step {step} ("), said
    assert not ckpt.exists()

    strip = lambda p: [line.rsplit('"tokens_per_s"', 1)[0] for line in p.read_text().splitlines()]  # noqa: E731
    for name in names():
        clean = load_file(str(tmp_path / "clean" / name / "sae.safetensors"))
        resumed = load_file(str(out / name / "sae.safetensors"))
        for key in clean:
            assert torch.equal(clean[key], resumed[key]), (name, key)
        assert strip(out / name / "metrics.jsonl") == strip(tmp_path / "clean" / name / "metrics.jsonl")


def test_a_batch_smaller_than_the_world_is_one_line_error(store, tmp_path):
    r = subprocess.run(two_ranks(store, tmp_path / "out", "--tokens", "630", "--batch-size", "1"), env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    said = [line for line in r.stderr.splitlines() if line.startswith("routesae: error:")]
    assert said and set(said) == {"routesae: error: --batch-size 1 is smaller than the 2 ranks of this torchrun: "
                                  "each rank needs a slice of every batch"}, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_folder_rank_0_refuses_stops_every_rank_with_its_one_line(store, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("not a fit")
    r = subprocess.run(two_ranks(store, out, "--tokens", "630"), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    said = [line for line in r.stderr.splitlines() if line.startswith("routesae: error:")]
    assert said == [f"routesae: error: --out {out} exists, is not empty and holds no routesae fit; choose another folder"], \
        r.stderr[-2000:]
    assert "[rank1]" not in r.stderr  # no traceback from the rank that waited for rank 0's verdict
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- the batch-wide primitives, on two gloo ranks in this machine ----------------------------------


def _primitives(rank: int, rendezvous: str) -> None:
    from routesae.train.distributed import Group, Shard, gather_rows, global_min, global_topk, token_mean

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        group = Group(rank, 2, torch.device("cpu"))
        batch = torch.arange(5 * 3, dtype=torch.float32).view(5, 3).sin()
        mine, shard = group.slice(batch)
        assert shard == Shard(3 - rank, 5, False) and torch.equal(mine, batch[:3] if rank == 0 else batch[3:])
        with group.shard(shard):
            assert torch.equal(gather_rows(mine), batch)  # uneven slices, laid back in order
            assert global_min([0.5, -2.0][rank]) == -2.0
            # ties at the cut are shared out in rank order: exactly `count` kept over both ranks
            flat = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0]][rank])
            values, indices = global_topk(flat, 3)
            assert sorted(values.tolist()) == [[1.0, 1.0], [2.0]][rank], values  # 2 + 1 = 3
            assert torch.equal(flat[indices], values)
            # a loss not linear in the batch mean gets the one-process gradient after reduce_gradients
            w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5]))
            (token_mean(mine @ w) - 1).square().backward()
        group.reduce_gradients([w], shard)
        ref = torch.nn.Parameter(w.detach().clone())
        ((batch @ ref).mean() - 1).square().backward()
        torch.testing.assert_close(w.grad, ref.grad, rtol=1e-6, atol=1e-7)
        # a batch shorter than the world: every rank takes all of it, nothing is exchanged
        small, tiny = group.slice(batch[:1])
        assert tiny.replicated and tiny.share == 0.5 and small.shape[0] == 1
    finally:
        dist.destroy_process_group()


def test_batch_wide_primitives_on_two_ranks(tmp_path):
    mp.spawn(_primitives, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2)
