"""`routesae repair` rewrites the damaged shards of a store so that it ends byte for byte as the
harvest wrote it, and refuses, changing nothing, where it could not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from routesae.cli import main
from routesae.model.loading import load_model
from routesae.harvest.repair import RepairConfig, repair_store
from routesae.harvest.run import HarvestConfig, run_harvest
from routesae.store.zarr_store import Cache
from tiny_models import tiny_model, tiny_tokenizer


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=["none", "blosc-zstd"])
def harvested(request, tiny_llama_dir, tmp_path_factory):
    """A tiny Llama store of 6 shards (the last one short) and a copy of its files."""
    out = tmp_path_factory.mktemp(f"repair-{request.param}") / "s.zarr"
    run_harvest(HarvestConfig(out=str(out), model=str(tiny_llama_dir), dataset="builtin", tokens=2816, layers="all",
                              context_len=32, batch_size=4, shard_tokens=512, min_chunk_bytes=1024,
                              compression=request.param, progress=False))
    assert Cache.open(out).layout.shard_tokens == 512
    return out, files(out)


def damage(store: Path) -> list[Path]:
    """Damage in three shards: an act shard truncated, a token-id chunk deleted, and the short last
    shard of another layer deleted."""
    hit = [store / "acts" / "2" / "c" / "1" / "0", store / "token_ids" / "c" / "3", store / "acts" / "4" / "c" / "5" / "0"]
    hit[0].write_bytes(hit[0].read_bytes()[:1000])
    hit[1].unlink()
    hit[2].unlink()
    return hit


def test_repair_gives_back_the_harvest_byte_for_byte(harvested, tmp_path):
    original, want = harvested
    store = tmp_path / "s.zarr"
    shutil.copytree(original, store)
    damage(store)
    assert files(store).keys() != want.keys()
    r = CliRunner().invoke(main, ["repair", "--quiet", str(store)])
    assert r.exit_code == 0, r.output
    assert "3 damaged file(s) in shard(s) 1, 3, 5 harvested again" in r.stdout
    assert files(store) == want
    assert CliRunner().invoke(main, ["info", "--verify", "--quiet", str(store)]).exit_code == 0
    again = CliRunner().invoke(main, ["repair", "--quiet", str(store)])
    assert again.exit_code == 0 and "nothing to repair" in again.stdout


def test_repair_refuses_another_corpus_and_changes_nothing(harvested, tmp_path):
    original, _ = harvested
    store = tmp_path / "s.zarr"
    shutil.copytree(original, store)
    damage(store)
    before = files(store)
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Another corpus, document {i}, with words the harvest never saw." * 20
                                 for i in range(200)))
    r = CliRunner().invoke(main, ["repair", "--quiet", "--dataset", str(other), str(store)])
    assert r.exit_code == 1 and "other tokens than shard 1" in r.stderr, r.output
    assert files(store) == before


def test_repair_refuses_a_forward_that_differs_and_changes_nothing(harvested, tmp_path, tiny_llama_dir):
    original, _ = harvested
    store = tmp_path / "s.zarr"
    shutil.copytree(original, store)
    damage(store)
    before = files(store)
    loaded = load_model(str(tiny_llama_dir), "bfloat16", "cpu")
    loaded.model.load_state_dict(tiny_model("llama", seed=1).state_dict())  # other weights, same shapes
    from routesae.errors import RouteSAEError

    with pytest.raises(RouteSAEError, match="forward differs from the harvest's on layer 0 of shard 1"):
        repair_store(RepairConfig(str(store), progress=False), loaded=loaded)
    assert files(store) == before


def test_repair_refuses_a_model_of_another_revision(harvested, tmp_path):
    original, _ = harvested
    store = tmp_path / "s.zarr"
    shutil.copytree(original, store)
    damage(store)
    moved = tmp_path / "model"
    tiny_model("llama", seed=1).save_pretrained(moved)
    tiny_tokenizer().save_pretrained(moved)
    r = CliRunner().invoke(main, ["repair", "--quiet", "--model", str(moved), str(store)])
    assert r.exit_code == 1 and "refusing to repair with a different model" in r.stderr, r.output
