"""Learned-mask circuits: the spliced model at all-on / all-off, gradients, seeds, a planted toy."""

from __future__ import annotations

import torch
from routesae.circuits.masks import MaskConfig, train_masks
from routesae.circuits.splice import CircuitModel, PairBatch, logit_diff
from routesae.model.residual import ResidualEditor
from routesae.train.config import SAEConfig
from routesae.train.normalize import denormalize
from routesae.train.saes import build_sae
from tiny_models import tiny_model


def random_sae(layer: int, d: int = 64, n: int = 64, k: int = 8, seed: int = 0, arch: str = "topk"):
    torch.manual_seed(seed)
    return build_sae(SAEConfig(arch=arch, d_model=d, n_latents=n, k=k, layers=[layer])).eval()


def random_setup(error: str = "kept", ablation: str = "mean", layers=(1, 2, 3)):
    model = tiny_model("llama", 4).float()
    saes = [random_sae(layer, seed=layer) for layer in layers]
    cm = CircuitModel(model, saes, error=error, ablation=ablation)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 500, (4, 6), generator=g)
    clean[:, 0] = 1
    patch = clean.clone()
    patch[:, 2:] = torch.randint(3, 500, (4, 4), generator=g)
    batch = PairBatch(clean, patch, torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11, 12]))
    return cm, batch


def plain_metric(model, batch: PairBatch, edits=None) -> torch.Tensor:
    with torch.no_grad(), ResidualEditor(model, edits or {}):
        logits = model(input_ids=batch.clean).logits[:, -1].float()
    return logit_diff(logits, batch)


def sae_splice_edit(sae, error_mean: torch.Tensor | None = None, z_const: torch.Tensor | None = None):
    """An independent splice through the SAE's public API: reconstruct (or decode a fixed code)."""

    def fn(hidden, call):
        x = hidden[:, 1:]
        if z_const is None:
            recon = sae.reconstruct(x)
        else:
            _, mean, std = sae.normalize_input(x)
            recon = denormalize(sae.decode(z_const.expand(x.shape[0], -1, -1)), mean, std)
        if error_mean is not None:
            recon = recon + error_mean
        return torch.cat([hidden[:, :1], recon.to(hidden.dtype)], dim=1)

    return fn


def test_all_on_equals_spliced_model():
    cm, batch = random_setup(error="kept")
    mu = cm.means(batch.patch)
    on = cm.metric(batch, mu, masks=cm.full_masks(5, 1.0))
    # error kept, every latent on: exactly the model's own forward
    assert torch.allclose(on, plain_metric(cm.model, batch), atol=1e-4)
    # error dropped: the model with each SAE's reconstruction spliced (the SAE's own API)
    cm.error = "dropped"
    on = cm.metric(batch, mu, masks=cm.full_masks(5, 1.0))
    edits = {layer: sae_splice_edit(sae) for layer, sae in cm.by_layer.items()}
    assert torch.allclose(on, plain_metric(cm.model, batch, edits), atol=1e-4)
    assert not torch.allclose(on, plain_metric(cm.model, batch), atol=1e-3)


def test_all_off_equals_all_mean_ablated_model():
    cm, batch = random_setup(error="mean")
    mu = cm.means(batch.patch)
    off = cm.metric(batch, mu, masks=cm.full_masks(5, 0.0))
    edits = {layer: sae_splice_edit(sae, mu.error[layer], mu.z[layer]) for layer, sae in cm.by_layer.items()}
    assert torch.allclose(off, plain_metric(cm.model, batch, edits), atol=1e-4)
    # zero ablation, error dropped: every layer decodes the zero code (b_dec only)
    cm.ablation, cm.error = "zero", "dropped"
    off = cm.metric(batch, mu, masks=cm.full_masks(5, 0.0))
    zero = {layer: sae_splice_edit(sae, None, torch.zeros_like(mu.z[layer])) for layer, sae in cm.by_layer.items()}
    assert torch.allclose(off, plain_metric(cm.model, batch, zero), atol=1e-4)


def test_means_are_the_patch_run_means():
    cm, batch = random_setup()
    mu = cm.means(batch.patch)
    with torch.no_grad():
        hs = cm.model(input_ids=batch.patch, output_hidden_states=True).hidden_states
    for layer, sae in cm.by_layer.items():
        z = sae.encode(hs[layer][:, 1:])
        assert torch.allclose(mu.z[layer], z.mean(0), atol=1e-5)
        err = hs[layer][:, 1:].float() - sae.reconstruct(hs[layer][:, 1:])
        assert torch.allclose(mu.error[layer], err.mean(0), atol=1e-5)


def test_gradients_reach_only_the_mask_logits():
    cm, batch = random_setup(error="mean")
    mu = cm.means(batch.patch)
    logits = {layer: torch.full((5, n), 0.5, requires_grad=True) for layer, n in cm.n_latents.items()}
    masks = {layer: torch.sigmoid(3.0 * t) for layer, t in logits.items()}
    cm.metric(batch, mu, masks=masks).mean().backward()
    for t in logits.values():
        assert t.grad is not None and t.grad.abs().sum() > 0
    params = list(cm.model.parameters()) + [p for s in cm.saes for p in s.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in params)
    assert all(t.grad is None for t in (*mu.z.values(), *mu.error.values()))


def test_fixed_seed_same_circuit():
    cm, batch = random_setup(error="mean")
    mu = cm.means(batch.patch)
    data = [(batch, mu), (PairBatch(batch.clean[:2], batch.patch[:2], batch.clean_answer[:2], batch.patch_answer[:2]),
                          cm.means(batch.patch[:2]))]
    cfg = MaskConfig(lam=0.02, steps=12, lr=0.2, seed=3)
    a = train_masks(cm, data, 5, cfg)
    b = train_masks(cm, data, 5, cfg)
    assert a.n_nodes == b.n_nodes
    for layer in a.circuit:
        assert torch.equal(a.circuit[layer], b.circuit[layer])
        assert torch.equal(a.logits[layer], b.logits[layer])


# --- a toy with a planted two-latent mechanism ------------------------------------------------------
CLEAN_LAST, PATCH_LAST, CLEAN_ANS, PATCH_ANS = 20, 21, 30, 31
PLANTED = (0, 1)
"""The two latents that carry the answer (at the last position)."""


def planted_toy(error: str = "mean") -> tuple[CircuitModel, PairBatch]:
    """A Llama whose blocks are identities (attention and MLP outputs zeroed) and final norm
    removed, so the last-position logits read the edited residual linearly; an exact ReLU SAE at
    layer 1 whose latents are the first 16 basis directions. The clean last token holds latents
    0 and 1 (which the clean answer's logit reads) and 5; the patch last token holds 5 and 6."""
    model = tiny_model("llama", 2).float()
    d = model.config.hidden_size
    eye = torch.eye(d)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.model.norm = torch.nn.Identity()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[1] = eye[15]  # BOS
        emb[CLEAN_LAST] = 2 * eye[0] + 2 * eye[1] + eye[5]
        emb[PATCH_LAST] = eye[5] + 2 * eye[6]
        for t in range(10, 14):
            emb[t] = eye[3] + eye[7 + t - 10]
        head = model.lm_head.weight
        head.zero_()
        head[CLEAN_ANS] = eye[0] + eye[1]
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="vanilla", d_model=d, n_latents=16, k=4, layers=[1], normalization="none")).eval()
    with torch.no_grad():
        sae.coder.W_enc.copy_(eye[:16])
        sae.coder.W_dec.copy_(eye[:16])
        sae.coder.b_enc.zero_()
        sae.coder.b_dec.zero_()
    cm = CircuitModel(model, [sae], error=error)
    mids = torch.arange(10, 14)
    clean = torch.stack([torch.ones(4, dtype=torch.long), mids, torch.full((4,), CLEAN_LAST)], 1)
    patch = torch.stack([torch.ones(4, dtype=torch.long), mids, torch.full((4,), PATCH_LAST)], 1)
    return cm, PairBatch(clean, patch, torch.full((4,), CLEAN_ANS), torch.full((4,), PATCH_ANS))


def test_planted_toy_masks_find_the_two_latents():
    cm, batch = planted_toy()
    mu = cm.means(batch.patch)
    assert torch.allclose(cm.metric(batch, mu), torch.full((4,), 4.0))
    res = train_masks(cm, [(batch, mu)], 2, MaskConfig(lam=0.05, steps=150, lr=0.1))
    circuit = res.circuit[1]
    assert res.n_nodes == 2, res.n_nodes
    assert circuit[-1, list(PLANTED)].all()
    with torch.no_grad():
        m = cm.metric(batch, mu, masks={1: circuit.float()})
    assert torch.allclose(m, torch.full((4,), 4.0), atol=1e-4)


# --- end to end: `routesae circuit` on a tiny store with SAEs at three layers ----------------------
WORDS = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "as", "with", "at", "by"]


def tiny_task(path, n: int = 24, seed: int = 0) -> None:
    """Pairs of single-token-word prompts; the clean and patch prompts differ in their second word;
    one record of another length, to exercise the length groups."""
    import json
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(n):
        w = rng.sample(WORDS, 5)
        length = 3 if i % 6 else 4
        clean = "".join(f" {x}" for x in [w[0], w[1], *w[3:3 + length - 2]])
        patch = "".join(f" {x}" for x in [w[0], w[2], *w[3:3 + length - 2]])
        lines.append({"clean_prefix": clean, "patch_prefix": patch, "clean_answer": " be", "patch_answer": " are",
                      "split": "eval" if i % 3 == 0 else "train", "task": "toy", "id": i})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_circuit_command_end_to_end(tmp_path):
    import json

    from click.testing import CliRunner
    from routesae.cli import main
    from routesae.harvest.run import HarvestConfig, run_harvest
    from routesae.train.config import FitConfig
    from routesae.train.trainer import fit
    from tiny_models import save_tiny

    model_dir = save_tiny("llama", tmp_path / "model")
    run_harvest(HarvestConfig(out=str(tmp_path / "s.zarr"), model=str(model_dir), dataset="builtin", tokens=4096,
                              layers="all", context_len=32, batch_size=8, progress=False, min_chunk_bytes=1024))
    fit(FitConfig(cache=str(tmp_path / "s.zarr"), out=str(tmp_path / "runs"), archs=["topk"], ks=[8], latents=64,
                  batch_size=256, eval_tokens=0.25, layer=[1, 2, 3], progress=False, tokens=4096))
    tiny_task(tmp_path / "task.jsonl")
    runs = [str(tmp_path / "runs" / f"topk-k8-l{i}") for i in (1, 2, 3)]
    # a stand-in `routesae contexts` folder for the layer-3 SAE (ctx/<SAE name>/)
    ctx = tmp_path / "ctx" / "topk-k8-l3"
    ctx.mkdir(parents=True)
    (ctx / "tokens.json").write_text(json.dumps([f"t{i}" for i in range(512)]))
    (ctx / "latents.jsonl").write_text("".join(
        json.dumps({"latent": i, "top": [{"token_ids": [5, 6, 7], "mark": 1}]}) + "\n" for i in range(64)))
    out = tmp_path / "circ"
    res = CliRunner().invoke(main, ["circuit", "--task", str(tmp_path / "task.jsonl"), "--saes", *runs,
                                    "--lambdas", "0.001:0.2:3", "--steps", "20", "--ig-steps", "3",
                                    "--device", "cpu", "--out", str(out), "--contexts", str(tmp_path / "ctx")])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "circuit.json").read_text())
    assert (out / "circuit.md").is_file() and (out / "faithfulness.png").stat().st_size > 1000
    assert [s["layer"] for s in result["saes"]] == [1, 2, 3]
    assert result["task"]["train_pairs"] + result["task"]["eval_pairs"] == 24
    assert len(result["circuits"]) == 3 and len(result["stability"]) == 2
    for c in result["circuits"]:
        # the baselines are cut at exactly the masks' node counts
        assert c["masks"]["n_nodes"] == c["ig"]["n_nodes"] == c["attribution_patching"]["n_nodes"] == c["n_nodes"]
        assert len(c["nodes"]) == c["n_nodes"]
    # the largest penalty keeps no more nodes than the smallest
    assert result["circuits"][-1]["n_nodes"] <= result["circuits"][0]["n_nodes"]
    assert result["contexts_found"] == ["topk-k8-l3"]
    l3 = [n for c in result["circuits"] for n in c["nodes"] if n["layer"] == 3]
    assert l3 and all(n["contexts"] == ["t5[[t6]]t7"] for n in l3)
    assert all("contexts" not in n for c in result["circuits"] for n in c["nodes"] if n["layer"] != 3)


def test_planted_toy_shared_positions():
    cm, batch = planted_toy()
    mu = cm.means(batch.patch)
    res = train_masks(cm, [(batch, mu)], 2, MaskConfig(lam=0.05, steps=150, lr=0.1, shared_positions=True))
    assert res.circuit[1].shape == (1, 16)
    assert res.n_nodes == 2 and res.circuit[1][0, list(PLANTED)].all()


def test_lambdas_and_task_tokenization(tmp_path):
    import pytest
    from routesae.circuits.run_circuit import parse_lambdas, read_records, tokenize_task
    from routesae.errors import RouteSAEError
    from tiny_models import tiny_tokenizer

    assert parse_lambdas("0.01:0.2:5") == pytest.approx([0.01, 0.021875, 0.05750, 0.116875, 0.2])
    assert parse_lambdas("0.1,0.3") == [0.1, 0.3]
    with pytest.raises(RouteSAEError):
        parse_lambdas("0.1:x:3")
    tiny_task(tmp_path / "t.jsonl")
    import json

    with open(tmp_path / "t.jsonl", "a") as f:  # unequal lengths, a two-token answer: skipped
        f.write(json.dumps({"clean_prefix": " the a", "patch_prefix": " the", "clean_answer": " be",
                            "patch_answer": " are", "split": "train", "task": "toy", "id": 98}) + "\n")
        f.write(json.dumps({"clean_prefix": " the a", "patch_prefix": " the of", "clean_answer": " be be",
                            "patch_answer": " are", "split": "train", "task": "toy", "id": 99}) + "\n")
    tok = tiny_tokenizer()
    data = tokenize_task(read_records(tmp_path / "t.jsonl"), tok, tok.bos_token_id, 5)
    assert data.skipped == {"prefix lengths differ": 1, "answer not one token": 1}
    assert data.n_pos == 4
    for b, _ in data.train + data.eval:
        assert b.clean.shape == b.patch.shape and (b.clean[:, 0] == tok.bos_token_id).all()
        assert b.clean.shape[0] <= 5
    assert sum(b.clean.shape[0] for b, _ in data.train + data.eval) == 24
