"""The interpretable-feature count says what it counted by: "the paper's rule" only at the paper's
threshold (15); at another, the threshold used and the paper's beside it, in every place the count or
a latent's verdict appears (terminal, counts.md, counts.json, contexts.json, dashboard index and pages)."""

from __future__ import annotations

import html
import json
import re

import pytest
from click.testing import CliRunner

from routesae.cli import main
from routesae.interpret.contexts import PAPER_THRESHOLD, rule_label
from tiny_models import tiny_store_with_saes


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    tiny_store_with_saes(root, ["topk", "routesae"], tokens=2048)
    return root


def _text(page: str) -> str:
    """A page's visible text, tags dropped and entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page))).strip()


def _stats(page: str) -> str:
    """The text of a page's stats line (where the count or the verdict stands)."""
    return _text(re.search(r'<div class="stats">(.*?)</div>', page, re.S).group(1))


@pytest.fixture(scope="module", params=[PAPER_THRESHOLD, 3.0, 1.0], ids=["paper-15", "at-3", "at-1"])
def run(request, store, tmp_path_factory):
    """contexts of both SAEs at one threshold, and the dashboard of one of them."""
    threshold = request.param
    out = tmp_path_factory.mktemp("run")
    made = CliRunner().invoke(main, ["contexts", "--sae", str(store / "runs"), "--cache", str(store / "s.zarr"),
                                     "--out", str(out / "ctx"), "--threshold", f"{threshold:g}", "--top", "4",
                                     "--quiet"])
    assert made.exit_code == 0, made.output
    dash = CliRunner().invoke(main, ["dashboard", "--contexts", str(out / "ctx" / "topk-k8"), "--out",
                                     str(out / "dash"), "--no-unembed", "--quiet"])
    assert dash.exit_code == 0, dash.output
    return threshold, out, made.output


def test_the_terminal_counts_md_and_counts_json_state_the_threshold(run):
    threshold, out, terminal = run
    md = (out / "ctx" / "counts.md").read_text()
    counts = json.loads((out / "ctx" / "counts.json").read_text())
    t = f"{threshold:g}"
    for text in (terminal, md):
        head = text.splitlines()[0]
        assert f"activation above {t}," in head
        assert f"| SAE | latents | interpretable (> {t}) | kept | active (> {t}) | dead |" in text
        if threshold == PAPER_THRESHOLD:
            assert head.startswith("Interpretable features by the paper's rule (activation above 15,"), head
        else:
            assert head.startswith(f"Features interpretable at threshold {t} (the paper's rule uses 15):"), head
            assert "by the paper's rule" not in text
    assert {c["name"] for c in counts} == {"topk-k8", "routesae-k8"}
    for c in counts:
        assert c["threshold"] == threshold and c["min_contexts"] == 4
        assert c["label"] == ("the paper's rule" if threshold == PAPER_THRESHOLD
                              else f"interpretable at threshold {t} (the paper's rule uses 15)")


def test_contexts_json_records_the_threshold_with_the_count(run):
    threshold, out, _ = run
    for name in ("topk-k8", "routesae-k8"):
        manifest = json.loads((out / "ctx" / name / "contexts.json").read_text())
        rule = manifest["paper_rule"]
        assert rule["threshold"] == threshold == manifest["settings"]["threshold"]
        assert rule["label"] == rule_label(manifest["settings"]).name
        assert (rule["label"] == "the paper's rule") == (threshold == PAPER_THRESHOLD)


def test_the_dashboard_index_and_pages_call_it_the_papers_rule_only_at_15(run):
    threshold, out, _ = run
    t = f"{threshold:g}"
    index = (out / "dash" / "index.html").read_text()
    manifest = json.loads((out / "ctx" / "topk-k8" / "contexts.json").read_text())
    n = manifest["paper_rule"]["interpretable"]
    stats = _stats(index)
    heads = [_text(h) for h in re.findall(r"<th[^>]*>.*?</th>", index)]
    pages = sorted((out / "dash" / "latents").glob("*.html"))
    verdict = re.compile(r"((?:the paper's|paper) rule: .*|at threshold \S+: .*)")
    verdicts = [verdict.search(_stats(p.read_text())).group(1) for p in pages]
    assert len(verdicts) == 64
    if threshold == PAPER_THRESHOLD:
        assert f"{n} interpretable by the paper's rule (activation above 15)" in stats, stats
        assert "Paper's rule (> 15)" in heads
        assert all(re.fullmatch(r"the paper's rule: (interpretable|not counted) \(\d+ distinct tokens above 15\)", v)
                   for v in verdicts), verdicts[:3]
    else:
        assert f"{n} interpretable at threshold {t} (the paper's rule uses 15)" in stats, stats
        assert f"At threshold {t}" in heads and not any("rule" in h.lower() for h in heads)
        for v in verdicts:
            assert re.fullmatch(rf"at threshold {t}: (interpretable|not counted) "
                                rf"\(\d+ distinct tokens above {t}; the paper's rule uses 15\)", v), v
        for p in [out / "dash" / "index.html", *pages]:
            assert "paper rule:" not in _text(p.read_text()).lower()
            assert "the paper's rule:" not in _text(p.read_text())
    if threshold == 1.0:  # here some latents pass: a page that says "interpretable" says at which threshold
        assert n > 0 and sum(": interpretable (" in v for v in verdicts) == n


@pytest.mark.parametrize("settings,name", [
    ({"rule": "paper", "threshold": 15.0, "min_contexts": 4}, "the paper's rule"),
    ({"rule": "paper-code", "threshold": 15.0, "min_contexts": 5}, "the paper code's rule"),
    ({"rule": "paper", "threshold": 3.0, "min_contexts": 4}, "interpretable at threshold 3 (the paper's rule uses 15)"),
    ({"rule": "paper", "threshold": 15.0, "min_contexts": 6},
     "interpretable at threshold 15, at least 6 contexts (the paper's rule uses at least 4 contexts)"),
    ({"rule": "paper-code", "threshold": 0.5, "min_contexts": 5},
     "interpretable at threshold 0.5 (the paper code's rule uses 15)"),
    ({}, "interpretable at an unrecorded threshold (the paper's rule uses 15)"),
])
def test_rule_label(settings, name):
    label = rule_label(settings)
    assert label.name == name
    assert label.paper == name.startswith("the paper")
