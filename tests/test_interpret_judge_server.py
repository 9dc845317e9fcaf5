"""`routesae interpret` end to end over HTTP: a real `transformers serve` process on 127.0.0.1
serving a transformers copy of the offline SmolLM2 (`routesae export-model`), judging a real
contexts folder of a tiny Llama's SAE. A 135M judge says little about the latents: this checks the
plumbing (server, client, prompts, parsing, output), not the scores."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from routesae.cli import main


def _serve_missing() -> str | None:
    try:
        import fastapi  # noqa: F401
        import transformers.cli.serve  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return f"`transformers serve` cannot be imported ({e}); pip install 'transformers[serving]'"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_serve_missing() is not None, reason=str(_serve_missing()))]


@pytest.fixture(scope="session")
def smollm2_copy(tmp_path_factory) -> Path:
    from routesae.model.local_copy import save_local_copy

    return save_local_copy("smollm2", tmp_path_factory.mktemp("smollm2-copy") / "smollm2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def judge_server(smollm2_copy, tmp_path_factory):
    """`transformers serve COPY` on a free port; yields its base URL; always stopped at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # One thread: on a small shared CPU, torch's threads fighting the test process for cores
    # make generation an order of magnitude slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(smollm2_copy),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer {url}/models within 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_contexts(tmp_path_factory, tiny_llama_dir) -> Path:
    """A real `routesae contexts` folder: a tiny Llama's store, one TopK SAE, few held-out windows."""
    from routesae.harvest.run import HarvestConfig, run_harvest
    from routesae.train.config import FitConfig
    from routesae.train.trainer import fit

    root = tmp_path_factory.mktemp("judge-ctx")
    run_harvest(HarvestConfig(out=str(root / "s.zarr"), model=str(tiny_llama_dir), dataset="builtin", tokens=4096,
                              layers="all", context_len=32, batch_size=8, progress=False, min_chunk_bytes=1024))
    fit(FitConfig(cache=str(root / "s.zarr"), out=str(root / "runs"), archs=["topk"], ks=[8], latents=64,
                  batch_size=256, eval_tokens=0.25, layer=3, progress=False, tokens=4096))
    result = CliRunner().invoke(main, ["contexts", "--sae", str(root / "runs"), "--cache", str(root / "s.zarr"),
                                       "--out", str(root / "ctx"), "--threshold", "1", "--top", "6", "--left", "6",
                                       "--right", "2", "--quantiles", "2", "--per-quantile", "1", "--samples", "3",
                                       "--negatives", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "ctx"


def _interpret(*args: object):
    return CliRunner().invoke(main, ["interpret", *map(str, args)])


def test_interpret_over_http_with_transformers_serve(tiny_contexts, judge_server, smollm2_copy, tmp_path):
    """transformers serve ignores response_format and logprobs but honours logit_bias: auto finds
    that out, forces one answer token a question, and every reply parses (a 135M judge's scores
    still mean nothing)."""
    out = tmp_path / "interp.json"
    args = ("--contexts", tiny_contexts, "--judge-url", judge_server, "--judge-model", smollm2_copy, "--features", 2,
            "--seed", 0, "--max-tokens", 32, "--concurrency", 1, "--out", out, "--quiet")
    result = _interpret(*args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "routesae-interpretations" and doc["version"] == 1
    assert doc["judge"] == {"url": judge_server, "model": str(smollm2_copy), "temperature": 0.0, "max_tokens": 32,
                            "mode": "logit_bias", "mode_reason": doc["judge"]["mode_reason"]}
    assert "ignores response_format and logprobs, honours logit_bias" in doc["judge"]["mode_reason"]
    assert "judge mode: logit_bias" in result.output
    assert doc["protocols"] == ["paper", "detection", "fuzzing"] and doc["features"] == 2 and len(doc["latents"]) == 2
    manifest = json.loads((tiny_contexts / "contexts.json").read_text())
    assert doc["contexts"]["sae"] == manifest["sae"] and doc["contexts"]["store"] == manifest["store"]
    latents = [json.loads(line) for line in (tiny_contexts / "latents.jsonl").read_text().splitlines()]
    for lat, entry in doc["latents"].items():
        rec = latents[int(lat)]
        paper = entry["paper"]
        assert not paper.get("parse_failure"), paper
        assert paper["category"] in ("low-level", "high-level", "undiscernible") and 1 <= paper["score"] <= 5
        assert paper["source"] in ("paper", "top")
        assert isinstance(entry["explanation"], str)
        for p in ("detection", "fuzzing"):
            s = entry[p]
            positives = len(rec["samples"])
            assert s["parse_failures"] == 0 and s["n"] == positives + min(positives, len(rec["negatives"]))
            assert s["balanced_accuracy"] is None or 0 <= s["balanced_accuracy"] <= 1
    paper = doc["summary"]["paper"]
    assert sum(paper["counts"].values()) == 2 and paper["parse_failures"] == 0
    for p in ("detection", "fuzzing"):
        assert doc["summary"][p]["parse_failures"] == 0
    assert {"balanced_accuracy", "precision", "recall", "f1", "parse_failures"} <= set(doc["summary"]["detection"])
    assert "wrote" in result.output and "0 replies from the cache" in result.output
    again = _interpret(*args)
    assert again.exit_code == 0 and "0 judge requests" in again.output and json.loads(out.read_text()) == doc


def test_local_judge_in_process(tiny_contexts, smollm2_copy, tmp_path):
    """The local judge constrained to the allowed answers: every reply parses."""
    out = tmp_path / "interp.json"
    result = _interpret("--contexts", tiny_contexts, "--judge-model", f"local:{smollm2_copy}", "--features", 1,
                        "--max-tokens", 24, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["judge"]["url"] == f"local:{smollm2_copy}" and doc["judge"]["mode"] == "constrained"
    (entry,) = doc["latents"].values()
    assert not entry["paper"].get("parse_failure") and entry["paper"]["score"] in range(1, 6)
    for p in ("detection", "fuzzing"):
        assert doc["summary"][p]["parse_failures"] == 0 and "auroc" in doc["summary"][p]


def test_export_model_keeps_a_finished_copy_and_refuses_foreign_folders(smollm2_copy, tmp_path):
    t = time.monotonic()
    again = CliRunner().invoke(main, ["export-model", "--model", "smollm2", "--out", str(smollm2_copy)])
    assert again.exit_code == 0 and f"wrote {smollm2_copy}" in again.output and time.monotonic() - t < 5
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2_copy.iterdir()}
    assert "quantization_config" not in json.loads((smollm2_copy / "config.json").read_text())
    (tmp_path / "junk.txt").write_text("mine")
    refused = CliRunner().invoke(main, ["export-model", "--model", "smollm2", "--out", str(tmp_path)])
    assert refused.exit_code == 1 and "not an empty folder" in refused.output
    other = CliRunner().invoke(main, ["export-model", "--model", "smollm2", "--out", str(smollm2_copy), "--dtype", "bfloat16"])
    assert other.exit_code == 1 and "another model or dtype" in other.output
