"""`routesae dashboard` on a tiny Llama's contexts: every latent reachable from the index, the shading
equal to the recorded activations, the decoder tokens equal to a brute-force W_U @ W_dec, user text
escaped, the index written last, bad input one line; and in headless Chromium what a person sees:
the text, the shading, the sort after a real click, links that resolve, orange on the screenshot."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from click.testing import CliRunner

from routesae.cli import main
from routesae.interpret import dashboard as D
from routesae.interpret import dashboard_html as H
from routesae.interpret.unembed import decoder_directions, top_bottom_tokens
from tiny_models import tiny_store_with_saes

EVIL_TOKEN = "<script>alert(1)</script>"
EVIL_EXPLANATION = "fires on <b>&\"' tokens"
EVIL_NAME = 'route<i>sae</i>&"x"'


def _run(*args):
    return CliRunner().invoke(main, ["dashboard", *map(str, args)])


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "latents.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    model_dir = tiny_store_with_saes(root, ["topk", "routesae", "crosscoder"])
    made = CliRunner().invoke(main, ["contexts", "--sae", str(root / "runs"), "--cache", str(root / "s.zarr"),
                                     "--out", str(root / "ctx"), "--threshold", "1", "--top", "6", "--left", "4",
                                     "--right", "2", "--quiet"])
    assert made.exit_code == 0, made.output
    # a copy whose SAE name and one activating token would be markup if not escaped
    evil = root / "evil"
    shutil.copytree(root / "ctx" / "routesae-k8", evil)
    manifest = json.loads((evil / "contexts.json").read_text())
    manifest["sae"]["name"] = EVIL_NAME
    (evil / "contexts.json").write_text(json.dumps(manifest))
    recs = _lines(evil)
    live = sorted((r for r in recs if r["count"]), key=lambda r: -r["count"])
    star, other = live[0]["latent"], live[1]["latent"]
    tokens = json.loads((evil / "tokens.json").read_text())
    top0 = live[0]["top"][0]
    tokens[top0["token_ids"][top0["mark"]]] = EVIL_TOKEN
    (evil / "tokens.json").write_text(json.dumps(tokens))
    interp = {
        "format": "routesae-interpretations", "version": 1,
        "contexts": {"path": str(evil), "sae": manifest["sae"], "store": manifest["store"]},
        "judge": {"url": "local:/nowhere", "model": "tiny-judge", "temperature": 0.0},
        "protocols": ["paper", "detection", "fuzzing"],
        "seed": 0, "features": 2,
        "latents": {
            str(star): {"paper": {"category": "high-level", "score": 4,
                                  "explanation": "paper says " + EVIL_EXPLANATION},
                        "explanation": EVIL_EXPLANATION,
                        "detection": {"balanced_accuracy": 0.875, "precision": 0.8, "recall": 1.0, "f1": 0.889, "n": 16,
                                      "parse_failures": 0},
                        "fuzzing": {"balanced_accuracy": 0.625, "precision": 0.6, "recall": 0.75, "f1": 0.667, "n": 16,
                                    "parse_failures": 1}},
            str(other): {"paper": {"parse_failure": True, "reply": "<junk reply>", "source": "top"},
                         "explanation": None, "explanation_reply": "<no explanation>", "detection": None,
                         "fuzzing": {"balanced_accuracy": None, "precision": None, "recall": None, "f1": None, "n": 0,
                                     "parse_failures": 0}},
        },
        "summary": {"paper": {"mean_score": 4.0}, "detection": {"balanced_accuracy": 0.875},
                    "fuzzing": {"balanced_accuracy": 0.625}},
    }
    (root / "interp.json").write_text(json.dumps(interp))
    result = _run("--contexts", evil, "--interp", root / "interp.json", "--out", root / "dash", "--quiet")
    assert result.exit_code == 0, result.output
    assert "wrote 64 latent pages" in result.output
    return {"root": root, "evil": evil, "dash": root / "dash", "star": star, "other": other, "model": model_dir,
            "tokens": tokens}


# ------------------------------------------------------------------------------------- HTML, parsed

VOID = {"meta", "input", "br", "img", "hr", "link"}


class Doc(HTMLParser):
    """A page as a flat list of elements, each with its attributes, its text and its ancestors."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[dict] = []
        self.nodes: list[dict] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "text": "", "parents": list(self.stack)}
        self.nodes.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for node in self.stack:
            node["text"] += data

    def find(self, tag, cls=None):
        return [n for n in self.nodes
                if n["tag"] == tag and (cls is None or cls in n["attrs"].get("class", "").split())]

    def hrefs(self):
        """Links to other files; a link within the page must name an element of it."""
        links = [n["attrs"]["href"] for n in self.nodes if n["tag"] == "a" and "href" in n["attrs"]]
        ids = {n["attrs"].get("id") for n in self.nodes}
        assert all(h[1:] in ids for h in links if h.startswith("#"))
        return [h for h in links if not h.startswith("#")]


def _doc(path: Path) -> Doc:
    return Doc(path.read_text(encoding="utf-8"))


def _context_spans(doc: Doc) -> list[list[dict]]:
    """The token spans of each shaded window, in page order."""
    out = []
    for ctx in doc.find("span", "ctx"):
        out.append([n for n in doc.nodes if n["tag"] == "span" and n["parents"] and n["parents"][-1] is ctx])
    return out


def test_every_latent_is_reachable_and_every_link_resolves(world):
    dash, evil = world["dash"], world["evil"]
    recs = _lines(evil)
    index = _doc(dash / "index.html")
    linked = {h for h in index.hrefs()}
    assert linked == {f"latents/{i}.html" for i in range(64)}
    # live latents in the table, dead ones apart
    rows = [n for n in index.find("tr") if any(p["tag"] == "tbody" for p in n["parents"])]
    assert len(rows) == sum(1 for r in recs if r["count"])
    dead = index.find("p", "dead")
    dead_links = {n["text"] for n in index.nodes if n["tag"] == "a" and dead and dead[0] in n["parents"]}
    assert dead_links == {str(r["latent"]) for r in recs if not r["count"]}
    for page in [dash / "index.html", *sorted((dash / "latents").iterdir())]:
        for href in _doc(page).hrefs():
            assert (page.parent / href).is_file(), (page, href)
    # previous / next chain through every latent
    chain = [n["attrs"]["href"] for n in _doc(dash / "latents" / "5.html").nodes
             if n["attrs"].get("rel") in ("prev", "next")]
    assert chain == ["4.html", "6.html"]
    assert not any(n["attrs"].get("rel") == "prev" for n in _doc(dash / "latents" / "0.html").nodes)
    assert not list(dash.glob("**/.*.tmp")) and not list(dash.glob("**/*.partial"))


def test_tokens_are_shaded_by_activation_over_the_latent_max(world):
    dash, evil = world["dash"], world["evil"]
    vis = H.token_texts(world["tokens"])
    for rec in _lines(evil):
        doc = _doc(dash / "latents" / f"{rec['latent']}.html")
        examples = rec["top"] + [ex for q in rec["quantiles"] for ex in q]
        windows = _context_spans(doc)
        assert len(windows) == len(examples)
        for ex, spans in zip(examples, windows):
            assert [s["text"] for s in spans] == [html.unescape(vis[t]) for t in ex["token_ids"]]
            for j, (s, act) in enumerate(zip(spans, ex["acts"])):
                marked = j == ex["mark"]
                assert ("m" in s["attrs"].get("class", "").split()) == marked
                act = ex["activation"] if marked else act
                if act > 0:
                    alpha = float(re.fullmatch(r"background:rgba\(255,110,0,([0-9.]+)\)", s["attrs"]["style"]).group(1))
                    assert alpha == pytest.approx(min(1.0, max(0.05, act / rec["max"])), abs=0.006)
                    assert float(s["attrs"]["title"]) == pytest.approx(act, rel=1e-5)
                else:
                    assert "style" not in s["attrs"] and s["attrs"]["title"] == "0"


def test_user_text_is_escaped(world):
    dash, star, other = world["dash"], world["star"], world["other"]
    source = (dash / "latents" / f"{star}.html").read_text()
    doc = Doc(source)
    assert not doc.find("script") and not doc.find("i")  # neither the token nor the SAE name became markup
    assert EVIL_TOKEN in [s["text"] for w in _context_spans(doc) for s in w]
    assert EVIL_NAME in doc.find("title")[0]["text"] and EVIL_NAME in doc.find("h1")[0]["text"]
    assert html.escape(EVIL_EXPLANATION) in source and EVIL_EXPLANATION in doc.find("p", "expl")[0]["text"]
    assert not [n for n in doc.find("b") if n["text"] == "&\"'"]
    index_src = (dash / "index.html").read_text()
    index = Doc(index_src)
    (script,) = index.find("script")
    assert script["text"] == H.INDEX_JS and not index.find("i")
    assert EVIL_TOKEN in [n["text"] for n in index.find("span", "tok")] and html.escape(EVIL_EXPLANATION) in index_src
    judged = _doc(dash / "latents" / f"{other}.html").find("section", "judge")[0]["text"]
    assert "<junk reply>" in judged and "<no explanation>" in judged and "balanced accuracy undefined" in judged
    # self-contained: nothing fetched from anywhere
    for page in [dash / "index.html", dash / "latents" / f"{star}.html"]:
        d = _doc(page)
        assert not [n for n in d.nodes if n["tag"] in ("link", "img", "iframe") or "src" in n["attrs"]]
        assert "http://" not in page.read_text() and "https://" not in page.read_text()


def test_judge_histogram_and_layers_are_shown(world):
    dash, evil, star, other = world["dash"], world["evil"], world["star"], world["other"]
    recs = _lines(evil)
    layers = json.loads((evil / "contexts.json").read_text())["layers"]
    doc = _doc(dash / "latents" / f"{star}.html")
    judge = doc.find("section", "judge")[0]["text"]
    assert "high-level" in judge and "score 4/5" in judge and "balanced accuracy 0.875" in judge
    assert "balanced accuracy 0.625" in judge and "1 replies did not parse" in judge
    rec = recs[star]
    (hist,) = doc.find("svg", "hist")
    bars = [n for n in doc.nodes if n["tag"] == "rect" and hist in n["parents"]]
    assert sum(int(b["text"].rsplit(": ", 1)[1]) for b in bars) == rec["count"]
    used = [i for i, c in enumerate(rec["histogram"]) if c]
    assert len(bars) == min(59, used[-1] + 2) - max(0, used[0] - 2) + 1
    (lay,) = doc.find("svg", "layers")
    bars = [n for n in doc.nodes if n["tag"] == "rect" and lay in n["parents"]]
    assert [b["text"].split(":")[0] for b in bars] == [f"layer {x}" for x in layers]
    assert [int(b["text"].split(": ")[1].split()[0]) for b in bars] == rec["layers"]
    index = _doc(dash / "index.html")
    heads = [n["attrs"].get("data-k") for n in index.find("th")]
    assert heads[:8] == ["latent", "frequency", "count", "max", "layer", "rule", "score", "detection"]
    cells = _row(index, star)
    assert cells[6]["attrs"]["data-v"] == "4" and cells[7]["attrs"]["data-v"] == "0.875"
    top_layer = layers[max(range(len(layers)), key=rec["layers"].__getitem__)]
    assert cells[4]["attrs"]["data-v"] == str(top_layer)
    assert _row(index, other)[6]["attrs"]["data-v"] == ""  # a parse failure: no score


def _row(index: Doc, latent: int) -> list[dict]:
    """The cells of a latent's row of the index table."""
    for tr in index.find("tr"):
        cells = [n for n in index.find("td") if n["parents"] and n["parents"][-1] is tr]
        if cells and cells[0]["attrs"].get("data-v") == str(latent):
            return cells
    raise AssertionError(f"no row for latent {latent}")


def _brute_tokens(world, name, latent, layer_slice):
    from routesae.model.loading import load_model
    from routesae.train.load import load_sae

    sae = load_sae(world["root"] / "runs" / name)
    w_dec = sae.export_tensors()["W_dec"]
    direction = (w_dec[:, -1] if layer_slice else w_dec)[latent].float()
    llm = load_model(str(world["model"]), sae.config.model.get("dtype", "bfloat16"), "cpu").model
    w_u = llm.get_output_embeddings().weight
    logits = w_u.float() @ direction
    return logits.topk(10), logits.topk(10, largest=False)


def _unembed_rows(doc):
    tables = doc.find("table", "unembed")
    out = []
    for t in tables:
        rows = [n for n in doc.find("tr") if t in n["parents"]]
        out.append([[c["text"] for c in doc.find("td") if r in c["parents"]] for r in rows])
    return out


@pytest.mark.parametrize("name", ["routesae-k8", "crosscoder-k8"])
def test_decoder_tokens_equal_a_brute_force_unembedding(world, tmp_path, name):
    root = world["root"]
    if name == "routesae-k8":
        doc, latent = _doc(world["dash"] / "latents" / f"{world['star']}.html"), world["star"]
        tokens = world["tokens"]
    else:
        latent = 7
        r = _run("--contexts", root / "ctx" / name, "--out", tmp_path / "d", "--latents", "5-9", "--quiet")
        assert r.exit_code == 0, r.output
        doc = _doc(tmp_path / "d" / "latents" / f"{latent}.html")
        assert "last layer" in (tmp_path / "d" / "latents" / f"{latent}.html").read_text()
        tokens = json.loads((root / "ctx" / name / "tokens.json").read_text())
    top, bottom = _brute_tokens(world, name, latent, name.startswith("crosscoder"))
    shown_top, shown_bottom = _unembed_rows(doc)
    for shown, want in ((shown_top, top), (shown_bottom, bottom)):
        assert [r[0] for r in shown] == [H.visible(tokens[i]) for i in want.indices.tolist()]
        assert [float(r[1]) for r in shown] == pytest.approx(want.values.tolist(), abs=1.5e-3)


def test_unembed_helpers():
    torch.manual_seed(0)
    d, w_u = torch.randn(5, 8), torch.randn(30, 8)
    ti, tv, bi, bv = top_bottom_tokens(d, w_u, n=4, chunk=2)
    full = d @ w_u.T
    assert torch.equal(ti, full.topk(4, 1).indices) and torch.allclose(bv, full.topk(4, 1, largest=False).values)
    rows, note = decoder_directions({"W_dec": torch.randn(6, 3, 8)}, [1, 2, 3])
    assert rows.shape == (6, 8) and "hidden state 3" in note
    assert decoder_directions({}, [1])[0] is None


def test_visible_whitespace_and_selections():
    assert H.visible("\n") == "\u21b5" and H.visible(" ") == "\u00b7" and H.visible(" the") == " the"
    assert H.visible("a\tb") == "a\u21e5b" and H.visible("\x7f") == "\\x7f" and H.visible("\ufe0f") == "\\ufe0f"
    assert H.visible("") == "\u2205"
    assert D.parse_latents(None, 4) == [0, 1, 2, 3] and D.parse_latents("2", 9) == [0, 1]
    assert D.parse_latents("7,", 9) == [7] and D.parse_latents("3, 1-2,8", 9) == [1, 2, 3, 8]
    assert D.parse_latents("50", 9) == list(range(9))


def test_a_selection_writes_only_its_pages_and_a_rerun_drops_the_rest(world, tmp_path):
    ctx = world["root"] / "ctx" / "topk-k8"
    out = tmp_path / "d"
    r = _run("--contexts", ctx, "--out", out, "--no-unembed", "--quiet")
    assert r.exit_code == 0, r.output
    assert len(list((out / "latents").iterdir())) == 64
    index = _doc(out / "index.html")
    assert "layer" not in [n["attrs"].get("data-k") for n in index.find("th")]  # a single-layer SAE: no layers
    assert not _doc(out / "latents" / "0.html").find("svg", "layers")
    r = _run("--contexts", ctx, "--out", out, "--no-unembed", "--latents", "3,10-12", "--quiet")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["10.html", "11.html", "12.html", "3.html"]
    assert set(_doc(out / "index.html").hrefs()) == {f"latents/{i}.html" for i in (3, 10, 11, 12)}
    rels = {n["attrs"]["rel"]: n["attrs"]["href"] for n in _doc(out / "latents" / "10.html").nodes
            if "rel" in n["attrs"]}
    assert rels == {"prev": "3.html", "next": "11.html"}
    assert "Decoder direction" not in (out / "latents" / "3.html").read_text()  # --no-unembed


def test_an_interrupted_run_never_leaves_an_index_with_missing_pages(world, tmp_path, monkeypatch):
    ctx = world["root"] / "ctx" / "topk-k8"
    real = H.latent_page
    calls = {"n": 0}

    def dies_after_three(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(H, "latent_page", dies_after_three)
    cfg = D.DashboardConfig(contexts=str(ctx), out=str(tmp_path / "fresh"), unembed=False, progress=False)
    with pytest.raises(KeyboardInterrupt):
        D.run_dashboard(cfg)
    assert not (tmp_path / "fresh" / "index.html").exists()
    # over a finished dashboard of another selection: the old index stays, and its links still resolve
    monkeypatch.setattr(H, "latent_page", real)
    old = tmp_path / "old"
    D.run_dashboard(D.DashboardConfig(contexts=str(ctx), out=str(old), unembed=False, progress=False, latents="20"))
    before = (old / "index.html").read_text()
    calls["n"] = 0
    monkeypatch.setattr(H, "latent_page", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        D.run_dashboard(D.DashboardConfig(contexts=str(ctx), out=str(old), unembed=False, progress=False,
                                          latents="30-40"))
    assert (old / "index.html").read_text() == before
    assert all((old / h).is_file() for h in Doc(before).hrefs())


def _one_line_error(result, match):
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("routesae: error:") and match in lines[0], result.stderr


def test_bad_input_is_one_line(world, tmp_path):
    root, evil = world["root"], world["evil"]
    out = tmp_path / "d"
    _one_line_error(_run("--contexts", tmp_path / "nowhere", "--out", out), "no contexts folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(_run("--contexts", tmp_path / "empty", "--out", out), "holds no contexts.json")
    _one_line_error(_run("--contexts", root / "ctx", "--out", out), "several SAEs")
    broken = tmp_path / "broken"
    shutil.copytree(root / "ctx" / "topk-k8", broken)
    (broken / "contexts.json").write_text("{not json")
    _one_line_error(_run("--contexts", broken, "--out", out), "not readable JSON")
    short = tmp_path / "short"
    shutil.copytree(root / "ctx" / "topk-k8", short)
    (short / "latents.jsonl").write_text("".join((short / "latents.jsonl").read_text().splitlines(True)[:-1]))
    _one_line_error(_run("--contexts", short, "--out", out), "incomplete contexts folder")
    (short / "latents.jsonl").unlink()
    _one_line_error(_run("--contexts", short, "--out", out), "has no latents.jsonl")
    interp = json.loads((root / "interp.json").read_text())
    # interp.json of another contexts folder: another SAE's weights, or another folder that still exists
    sae = dict(interp["contexts"]["sae"], weights_sha256="0" * 64)
    other = dict(interp, contexts=dict(interp["contexts"], sae=sae))
    (tmp_path / "other.json").write_text(json.dumps(other))
    _one_line_error(_run("--contexts", evil, "--interp", tmp_path / "other.json", "--out", out), "another SAE")
    elsewhere = dict(interp, contexts={"path": str(root / "ctx" / "topk-k8")})
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    _one_line_error(_run("--contexts", evil, "--interp", tmp_path / "elsewhere.json", "--out", out),
                    "interprets the contexts folder")
    (tmp_path / "bad.json").write_text('{"format": "routesae-interpretations", ')
    _one_line_error(_run("--contexts", evil, "--interp", tmp_path / "bad.json", "--out", out), "not readable JSON")
    _one_line_error(_run("--contexts", evil, "--out", out, "--latents", "60-70", "--no-unembed"), "out of range")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _one_line_error(_run("--contexts", evil, "--out", tmp_path / "busy", "--no-unembed"), "not a dashboard folder")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    _one_line_error(_run("--contexts", evil, "--out", out, "--sae", tmp_path / "nosae"), "no SAE folder")
    assert not out.exists()  # refused before anything was written


# ----------------------------------------------------------------------------------- in a real browser

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium binary found (install it: apt-get install -y chromium)")


HARNESS = """<!DOCTYPE html><html><body><pre id="out">pending</pre><iframe id="f" width="1200" height="800"></iframe>
<script>
var f = document.getElementById('f'), steps = %(steps)s, out = {};
function col(d, i) { return [].map.call(d.querySelectorAll('#latents tbody tr'),
  function (r) { return r.cells[i].getAttribute('data-v'); }); }
function run(d) {
  var w = d.defaultView;
  out.links = [].map.call(d.querySelectorAll('a[href]'), function (a) { return a.href; });
  out.text = [].map.call(d.querySelectorAll('.ctx'), function (c) { return c.textContent; });
  out.marked = [].map.call(d.querySelectorAll('.ctx .m'),
    function (s) { return w.getComputedStyle(s).backgroundColor; });
  out.unshaded = [].map.call(d.querySelectorAll('.ctx span[title="0"]'),
    function (s) { return w.getComputedStyle(s).backgroundColor; });
  out.order = {};
  var ths = d.querySelectorAll('#latents th');
  out.order.initial = col(d, 0);
  steps.forEach(function (s) {
    var i = [].findIndex.call(ths, function (t) { return t.getAttribute('data-k') === s; });
    ths[i].click();
    out.order[s + (out.order[s] ? ':again' : '')] = {latent: col(d, 0), value: col(d, i)};
  });
  document.getElementById('out').textContent = JSON.stringify(out);
}
f.onload = function () { try { run(f.contentDocument); } catch (e) {
  document.getElementById('out').textContent = 'ERROR ' + e; } };
f.src = %(src)s;
</script></body></html>"""


def _in_browser(exe: str, tmp_path: Path, url: str, steps=()) -> dict:
    """Load `url` in an iframe of a harness page, click the given index headers, read back the DOM."""
    harness = tmp_path / f"harness-{abs(hash((url, steps)))}.html"
    harness.write_text(HARNESS % {"steps": json.dumps(list(steps)), "src": json.dumps(url)})
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", harness.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert m and not m.group(1).startswith(("pending", "ERROR")), dom[:2000]
    return json.loads(html.unescape(m.group(1)))


def _alpha(css: str) -> float:
    m = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([0-9.]+))?\)", css)
    return float(m.group(4)) if m.group(4) is not None else 1.0


def _values(seq):
    return [float(v) if v not in (None, "") else None for v in seq]


def test_in_headless_chromium(world, tmp_path):
    exe = _chromium()
    dash, star, recs = world["dash"], world["star"], _lines(world["evil"])
    page = dash / "latents" / f"{star}.html"
    got = _in_browser(exe, tmp_path, page.as_uri())
    # the context text a person reads, whitespace made visible
    rec = recs[star]
    want = ["".join(H.visible(world["tokens"][t]) for t in ex["token_ids"])
            for ex in rec["top"] + [e for q in rec["quantiles"] for e in q]]
    assert got["text"] == want and EVIL_TOKEN in got["text"][0]
    assert got["marked"] and all(_alpha(c) > 0 for c in got["marked"])
    assert got["unshaded"] and all(_alpha(c) == 0 for c in got["unshaded"])
    for url in got["links"]:
        assert Path(unquote(urlparse(url).path)).is_file(), url
    # the sort, by real clicks on the index's headers
    got = _in_browser(exe, tmp_path, (dash / "index.html").as_uri(), ("max", "max", "frequency", "score", "layer"))
    for url in got["links"]:
        assert Path(unquote(urlparse(url).path)).is_file(), url
    order = got["order"]
    assert _values(order["initial"]) == sorted(_values(order["initial"]))
    desc = _values(order["max"]["value"])
    assert desc == sorted(desc, reverse=True) and desc[0] == pytest.approx(max(r["max"] for r in recs), rel=1e-5)
    asc = _values(order["max:again"]["value"])
    assert asc == sorted(asc)
    freq = _values(order["frequency"]["value"])
    assert freq == sorted(freq, reverse=True)
    assert order["score"]["latent"][0] == str(star) and order["score"]["value"][1] == ""  # unscored last
    layers = _values(order["layer"]["value"])
    assert layers == sorted(layers)
    # the same sort from the URL (#sort=KEY:DIR), as a link to a sorted index would give it
    got = _in_browser(exe, tmp_path, (dash / "index.html").as_uri() + "#sort=count:asc")
    counts = [int(v) for v in got["order"]["initial"]]  # column 0 is the latent; check it is a count order
    by_latent = {r["latent"]: r["count"] for r in recs}
    assert [by_latent[i] for i in counts] == sorted(by_latent[i] for i in counts)


def test_screenshot_shows_the_shading(world, tmp_path):
    exe = _chromium()
    import matplotlib.image

    shot = tmp_path / "latent.png"
    page = world["dash"] / "latents" / f"{world['star']}.html"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
                    "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120, check=True)
    img = matplotlib.image.imread(str(shot))[..., :3]
    orange = (img[..., 0] > 0.9) & (img[..., 1] > 0.3) & (img[..., 1] < 0.8) & (img[..., 2] < 0.45)
    assert orange.sum() > 500  # the histogram bars and the shaded tokens
