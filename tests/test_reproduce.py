"""`routesae reproduce`: experiment files checked in one line before anything runs, --plan, and a
tiny experiment on the tiny random-weight Llama run end to end, killed during each kind of stage
and rerun to the same numbers, then rerun after one architecture's setting changed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from routesae.errors import RouteSAEError
from routesae.reproduce.config import load_experiment

TINY = """
[experiment]
model = "{model}"
train_corpus = "builtin"
heldout_corpus = "builtin:docstrings"
train_tokens = "4096"
heldout_tokens = "1024"
archs = ["topk", "routesae"]
k = [8]
seeds = [0, 1]
budgets = [0.5, 1.0]

[harvest]
context_len = 64
batch_size = 4

[fit]
batch_size = 256
expansion = 4
eval_tokens = "0"
checkpoint_every = 4
{arch_table}
[eval]
splice = true
all_tokens = true

[contexts]
all_tokens = true

[dashboard]
latents = "10"

[[steer]]
arch = "routesae"
k = 8
latent = "top"
prompt = "def main():"
max_new_tokens = 4
mode = "add"
value = 5
"""


def write_tiny(path: Path, model: Path, arch_table: str = "") -> Path:
    path.write_text(TINY.format(model=model, arch_table=arch_table))
    return path


def reproduce(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routesae", "reproduce", *map(str, args)], capture_output=True,
                          text=True, timeout=900, **kw)


def one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("routesae: error:") and text in lines[0], r.stderr


# ------------------------------------------------------------------------------------------ checks

@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("[dashboard]", "[dashbord]"), "unknown table [dashbord]"),
    (lambda t: t.replace("expansion = 4", "expansoin = 4"), "[fit] unknown key 'expansoin'"),
    (lambda t: t.replace("expansion = 4", "out = 'x'"), "[fit] 'out' is set by the experiment itself"),
    (lambda t: t.replace('"topk", "routesae"', '"topk", "mlp"'), "unknown arch 'mlp'"),
    (lambda t: t.replace("budgets = [0.5, 1.0]", "budgets = [0.5]"), "1.0 among them"),
    (lambda t: t.replace("seeds = [0, 1]", "seeds = []"), "seeds must be a non-empty list"),
    (lambda t: t.replace('k = 8\nlatent = "top"', 'k = 16\nlatent = "top"'), "at k 16 is not trained"),
    (lambda t: t.replace("train_corpus = ", "# "), "[experiment] lacks train_corpus"),
])
def test_bad_experiment_files_fail_in_one_line(tmp_path, tiny_llama_dir, edit, message):
    path = tmp_path / "exp.toml"
    path.write_text(edit(TINY.format(model=tiny_llama_dir, arch_table="")))
    with pytest.raises(RouteSAEError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_experiment(str(path))


def test_missing_corpus_and_absent_layer_refused_before_anything_runs(tmp_path, tiny_llama_dir):
    base = TINY.format(model=tiny_llama_dir, arch_table="")
    cases = [
        (base.replace('heldout_corpus = "builtin:docstrings"', f'heldout_corpus = "{tmp_path}/nope.jsonl"'),
         "heldout_corpus: no such dataset file"),
        (base.replace("context_len = 64", 'context_len = 64\nlayers = "2-9"'), "[harvest] layers '2-9'"),
        (base.replace("[eval]", "[eval]\nbogus = 1"),
         "[eval] unknown key 'bogus': `routesae eval` has no option --bogus"),
    ]
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"exp{i}.toml"
        path.write_text(text)
        out = tmp_path / f"out{i}"
        one_line_error(reproduce(path, "--out", out), message)
        assert not out.exists(), "a refused experiment wrote nothing"


def test_plan_of_the_paper_preset_runs_nothing(tmp_path):
    out = tmp_path / "paper"
    r = reproduce("paper", "--plan", "--out", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    train = next(line for line in lines if line.startswith("harvest train"))
    # 100M tokens x 9 layers x 2048 x 2 bytes (+ 4 bytes of token id): the paper's 3.7 TB store
    assert "disk 3.7 TB" in train, train
    fits = [line for line in lines if line.startswith("fit ")]
    assert len(fits) == 9 * 3 * 4, "9 architectures x 3 seeds x 4 budgets, every k in one fit"
    assert "(estimate)" in train and "rough estimates" in r.stdout
    assert not out.exists()


# ------------------------------------------------------------------------------------------ end to end

def _state(out: Path) -> dict:
    try:
        return json.loads((out / "state.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}


def _run_killed_during(toml: Path, out: Path, stage_prefix: str, delay: float) -> bool:
    """Start the experiment, SIGKILL it `delay` seconds into the first stage named stage_prefix...
    that it starts (the stage's own process dies with it); False if it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "routesae", "reproduce", str(toml), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            running = [n for n, rec in _state(out).items() if rec.get("status") == "running" and n.startswith(stage_prefix)]
            if running:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.05)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _numbers(out: Path) -> dict:
    results = json.loads((out / "report" / "results.json").read_text())
    return results["budgets"]


def _same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for budget in a:
        assert a[budget]["rows"].keys() == b[budget]["rows"].keys()
        for row in a[budget]["rows"]:
            for metric, cell in a[budget]["rows"][row].items():
                other = b[budget]["rows"][row][metric]
                for key in ("mean", "low", "high"):
                    if cell[key] is None:
                        assert other[key] is None
                    else:
                        assert other[key] == pytest.approx(cell[key], rel=1e-9, abs=1e-12), (budget, row, metric, key)
        assert [c["difference"] for c in a[budget]["comparisons"]] == pytest.approx(
            [c["difference"] for c in b[budget]["comparisons"]], rel=1e-9)


def test_tiny_experiment_killed_anywhere_reruns_to_the_same_report(tmp_path, tiny_llama_dir):
    toml = write_tiny(tmp_path / "tiny.toml", tiny_llama_dir)
    clean = tmp_path / "clean"
    r = reproduce(toml, "--out", clean)
    assert r.returncode == 0, r.stderr[-3000:]
    report = clean / "report"
    assert (report / "report.html").exists() and (report / "report.md").exists()
    for png in ("sparsity_fidelity.png", "budget_curve.png", "routing.png"):
        assert (report / png).stat().st_size > 1000, png
    md = (report / "report.md").read_text()
    assert "Paired comparisons" in md and "routesae - topk" in md, md
    assert "[" in md.split("## Results at the full budget")[1].split("##")[0], "intervals over two seeds"

    # the table's intervals agree with a t interval computed here from each seed's eval report
    from scipy import stats as sst

    values = []
    for seed in (0, 1):
        table = json.loads((clean / "evals" / "budget-1" / f"seed-{seed}" / "report.json").read_text())["table"]
        values.append(next(row["fvu"] for row in table if row["name"] == "topk"))
    cell = _numbers(clean)["1.0"]["rows"]["topk"]["fvu"]
    half = sst.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
    assert cell["mean"] == pytest.approx(np.mean(values)) and cell["high"] == pytest.approx(np.mean(values) + half)

    # every stage records the code it ran on: this checkout's commit
    from routesae.reproduce.runner import code_version

    provenance = json.loads((report / "results.json").read_text())["provenance"]
    assert provenance["stages_ran_on"] == {code_version(): 18} and code_version() is not None

    _report_in_browser(report / "report.html", tmp_path)

    # a second run of a finished experiment runs nothing
    again = reproduce(toml, "--out", clean)
    assert again.returncode == 0 and "starting" not in again.stderr and "recomputing" not in again.stderr

    killed = tmp_path / "killed"
    hits = []
    for prefix, delay in (("harvest train", 3.0), ("fit budget-0.5 seed-0 routesae", 4.0), ("eval budget-0.5", 4.0),
                          ("fit budget-1 seed-1", 3.5), ("contexts", 3.0), ("dashboard", 2.0), ("steer", 3.0)):
        hits.append(_run_killed_during(toml, killed, prefix, delay))
    assert sum(hits) >= 5, hits
    r = reproduce(toml, "--out", killed)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_numbers(_numbers(clean), _numbers(killed))

    # one architecture's setting changed: only its fits and the stages after them run again
    write_tiny(toml, tiny_llama_dir, arch_table="\n[fit.arch.topk]\nlr = 1e-3\n")
    r = reproduce(toml, "--out", killed)
    assert r.returncode == 0, r.stderr[-3000:]
    # "reproduce: [3/18] fit budget-0.5 seed-0 topk: recomputing: ..." -> the stage's name
    ran = [line.split(": ", 2)[1].split("] ", 1)[1] for line in r.stderr.splitlines() if "recomputing" in line]
    assert sorted(n for n in ran if n.startswith("fit")) == sorted(
        f"fit budget-{b} seed-{s} topk" for b in ("0.5", "1") for s in (0, 1)), r.stderr
    assert not any("routesae" in n and n.startswith("fit") for n in ran)
    assert "--lr 0.001" in r.stderr
    assert "harvest" not in " ".join(ran)
    after = _numbers(killed)["1.0"]["rows"]
    before = _numbers(clean)["1.0"]["rows"]
    assert after["routesae"]["fvu"]["mean"] == pytest.approx(before["routesae"]["fvu"]["mean"], rel=1e-12)
    assert after["topk"]["fvu"]["mean"] != pytest.approx(before["topk"]["fvu"]["mean"], rel=1e-6)


HARNESS = """<!DOCTYPE html><html><body><pre id="out">pending</pre><iframe id="f" width="1200" height="900"></iframe>
<script>
var f = document.getElementById('f');
f.onload = function () { try { var d = f.contentDocument; document.getElementById('out').textContent = JSON.stringify({
  images: [].map.call(d.images, function (i) { return [i.alt, i.naturalWidth, i.naturalHeight]; }),
  links: [].map.call(d.querySelectorAll('a[href]'), function (a) { return a.href; }),
  cells: [].map.call(d.querySelectorAll('table')[0].querySelectorAll('tbody tr'),
    function (r) { return [].map.call(r.cells, function (c) { return c.textContent; }); }),
  headings: [].map.call(d.querySelectorAll('h2'), function (h) { return h.textContent; })});
} catch (e) { document.getElementById('out').textContent = 'ERROR ' + e; } };
f.src = %s;
</script></body></html>"""


def _report_in_browser(page: Path, tmp_path: Path) -> None:
    """The report as headless Chromium renders it: every plot decodes, links resolve, the table reads."""
    import html as htmllib
    import re
    import shutil
    from urllib.parse import unquote, urlparse

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no chromium binary found (install it: apt-get install -y chromium)")
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS % json.dumps(page.as_uri()))
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", harness.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert m and not m.group(1).startswith(("pending", "ERROR")), dom[:2000]
    got = json.loads(htmllib.unescape(m.group(1)))
    assert {alt for alt, _, _ in got["images"]} == {"sparsity_fidelity", "budget_curve", "routing"}
    assert all(w > 200 and h > 100 for _, w, h in got["images"]), got["images"]
    assert got["links"] and all(Path(unquote(urlparse(u).path)).is_file() for u in got["links"]), got["links"]
    assert [row[0] for row in got["cells"]][:2] == ["topk", "routesae"]
    assert all("[" in cell for row in got["cells"] for cell in row[2:3]), got["cells"]  # FVU with its interval
    assert "Paired comparisons" in got["headings"] and "Provenance" in got["headings"]


def test_one_experiment_folder_one_process(tmp_path, tiny_llama_dir):
    import fcntl

    toml = write_tiny(tmp_path / "tiny.toml", tiny_llama_dir)
    out = tmp_path / "exp"
    out.mkdir()
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(reproduce(toml, "--out", out), "is being run by another `routesae reproduce`")


def test_comparisons_against_mean_of_layers_rows_and_l0_flag():
    """RouteSAE against an MLSAE's mean-of-layers row (eval keeps only its layer rows' sums) and
    against a row whose L0 is off by more than 10%, on made-up per-context sums."""
    from routesae.reproduce.collect import Run, comparisons
    from routesae.reproduce.config import Experiment, Grid

    rng = np.random.default_rng(0)
    n = 12
    grid = Grid("m", "a", "b", "1", "1", ["routesae", "mlsae", "topk"], [8], [0, 1], [1.0])
    exp = Experiment("t", "t.toml", grid, {}, {}, [])

    def sums(kl: float, l0: float) -> dict:
        tokens = rng.integers(50, 60, n).astype(float)
        return {"n_tokens": tokens, "l0_sum": tokens * l0, "sse": rng.uniform(1, 2, n), "sst": rng.uniform(3, 4, n),
                "n_kl": tokens, "kl_sum": tokens * kl * rng.uniform(0.9, 1.1, n), "n_ce": tokens,
                "ce_clean_sum": tokens * 2.0, "ce_spliced_sum": tokens * (2.0 + kl), "ce_zero_sum": tokens * 5.0}

    runs = {}
    for seed in (0, 1):
        s = {"routesae": sums(0.5, 8), "mlsae @1": sums(0.9, 8), "mlsae @2": sums(0.7, 8), "topk": sums(0.6, 9.5)}
        s["mlsae (mean of 2 layers)"] = {f"{name}|{k}": v for name in ("mlsae @1", "mlsae @2") for k, v in s[name].items()}
        rows = {"routesae": {"arch": "routesae", "k": 8, "l0": 8.0},
                "mlsae @1": {"arch": "mlsae", "k": 8, "l0": 8.0, "layer_of": "mlsae"},
                "mlsae @2": {"arch": "mlsae", "k": 8, "l0": 8.0, "layer_of": "mlsae"},
                "mlsae (mean of 2 layers)": {"arch": "mlsae/mean", "k": 8, "l0": 8.0, "layer_of": "mlsae"},
                "topk": {"arch": "topk", "k": 8, "l0": 9.5}}
        runs[(1.0, seed)] = Run(rows, s, {})
    comps = {(c.other, c.metric): c for c in comparisons(exp, runs, 1.0)}
    assert ("mlsae @1", "kl_per_token") not in comps, "layer rows are not compared, their mean is"

    def kl(s):
        return s["kl_sum"].sum() / s["n_kl"].sum()

    want = np.mean([kl(runs[(1.0, seed)].sums["routesae"]) - np.mean(
        [kl(runs[(1.0, seed)].sums[f"mlsae @{j}"]) for j in (1, 2)]) for seed in (0, 1)])
    c = comps[("mlsae (mean of 2 layers)", "kl_per_token")]
    assert c.diff.estimate == pytest.approx(want, rel=1e-12)
    assert c.diff.low < c.diff.estimate < c.diff.high and c.verdict == "holds" and c.l0_matched
    t = comps[("topk", "kl_per_token")]
    assert not t.l0_matched and t.l0 == (8.0, 9.5)
