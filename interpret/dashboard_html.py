"""The dashboard's HTML: the index of latents and one page per latent, as strings.

Self-contained on purpose (SAEDashboard's pages pull d3 and plotly from CDNs and stay blank
offline): inline CSS, inline SVG charts and a few lines of vanilla JS for sorting the index; no
fonts, scripts or styles from anywhere else. Everything that comes from the user's data (token
texts, explanations, names, paths) goes through `esc`."""

from __future__ import annotations

import html
import unicodedata
from typing import Any, Iterable, NamedTuple

from routesae.interpret.contexts import rule_label

GENERATOR = "routesae dashboard"
"""The generator meta tag of every page: how a rerun knows a folder is a dashboard."""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1em auto;max-width:1150px;
padding:0 1em;color:#1d1d1f;background:#fff}
h1{font-size:1.45em;margin:.3em 0}h2{font-size:1.1em;margin:1.3em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:.8em 0 .2em;color:#444}
nav{display:flex;gap:1.2em;font-size:.95em;margin-bottom:.4em}
a{color:#0b57d0;text-decoration:none}a:hover{text-decoration:underline}
.muted{color:#666}.small{font-size:.88em}
.stats{display:flex;flex-wrap:wrap;gap:.4em 1.6em;margin:.4em 0}.stats b{font-weight:600}
table{border-collapse:collapse}
th,td{padding:2px 8px;text-align:right;border-bottom:1px solid #eee;vertical-align:top}
th.l,td.l{text-align:left}
#latents th[data-k]{cursor:pointer;user-select:none}
#latents th{position:sticky;top:0;background:#f3f4f6}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr:hover td{background:#fafafa}
.tok{font:12.5px ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;white-space:pre;background:#f3f4f6;
padding:0 3px;border-radius:3px}
.ex{display:flex;gap:.7em;border-bottom:1px solid #f0f0f0;padding:2px 0}
.ex .v{flex:0 0 4.6em;text-align:right;color:#444;font:12px/1.9 ui-monospace,"DejaVu Sans Mono",monospace}
.ex .ly{flex:0 0 2.8em;color:#777;font:12px/1.9 ui-monospace,"DejaVu Sans Mono",monospace}
.ctx{font:13px/1.9 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;white-space:pre-wrap;
overflow-wrap:anywhere}
.ctx span{border-radius:2px}
.ctx .m{outline:2px solid #b3261e;outline-offset:-1px;font-weight:700}
.judge{background:#f7f8fa;border:1px solid #e3e5e8;border-radius:6px;padding:.5em .9em}
.judge p{margin:.3em 0}
.cols{display:flex;flex-wrap:wrap;gap:0 2.5em}
.dead a{margin-right:.45em}
svg text{font:10px system-ui,sans-serif;fill:#555}
input[type=search]{font:inherit;padding:2px 6px;width:22em}
"""

INDEX_JS = """
(function(){
var t=document.getElementById('latents');if(!t)return;
var b=t.tBodies[0],hs=Array.prototype.slice.call(t.tHead.rows[0].cells),cur=null;
function val(r,i){var v=r.cells[i].getAttribute('data-v');return v===null||v===''?null:+v;}
function sort(k,dir){
  var i=-1;hs.forEach(function(h,j){if(h.getAttribute('data-k')===k)i=j;});if(i<0)return;
  var th=hs[i];dir=dir||th.getAttribute('data-d')||'desc';var s=dir==='asc'?1:-1;
  var rows=Array.prototype.map.call(b.rows,function(r){return [val(r,i),val(r,0),r];});
  rows.sort(function(x,y){var a=x[0],c=y[0];  /* rows without a value (no judge score) go last */
    if(a===null||c===null){if(a!==c)return a===null?1:-1;}else if(a!==c)return (a-c)*s;
    return x[1]-y[1];});
  var f=document.createDocumentFragment();rows.forEach(function(r){f.appendChild(r[2]);});b.appendChild(f);
  hs.forEach(function(h){h.removeAttribute('aria-sort');});
  th.setAttribute('aria-sort',dir==='asc'?'ascending':'descending');cur=[k,dir];
}
hs.forEach(function(h){var k=h.getAttribute('data-k');if(!k)return;
  h.title='sort by '+h.textContent;
  h.addEventListener('click',function(){
    var dir=cur&&cur[0]===k?(cur[1]==='asc'?'desc':'asc'):(h.getAttribute('data-d')||'desc');
    sort(k,dir);try{history.replaceState(null,'','#sort='+k+':'+dir);}catch(e){}
  });});
function fromHash(){var m=/sort=([a-z_]+)(?::(asc|desc))?/.exec(location.hash);if(m)sort(m[1],m[2]);}
window.addEventListener('hashchange',fromHash);fromHash();
var q=document.getElementById('filter'),shown=document.getElementById('shown');
if(q)q.addEventListener('input',function(){var s=q.value.toLowerCase(),n=0;
  Array.prototype.forEach.call(b.rows,function(r){var ok=!s||r.textContent.toLowerCase().indexOf(s)>=0;
    r.style.display=ok?'':'none';n+=ok;});shown.textContent=n;});
})();
"""


def esc(text: Any) -> str:
    """Text for HTML content or a quoted attribute."""
    return html.escape(str(text), quote=True)


_VISIBLE = {"\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}
_INVISIBLE = {"Cf", "Co", "Cn", "Cs", "Zl", "Zp", "Zs"}
"""Unicode categories that draw nothing (format, private, unassigned, separators other than ' ')."""
_SELECTORS = set(range(0xFE00, 0xFE10))
"""Variation selectors: marks that draw nothing alone."""


def visible(text: str) -> str:
    """A token's text with its whitespace made visible: newline as '↵', tab '⇥', CR '␍', other control
    and invisible characters as \\xNN or \\uNNNN, a token made only of spaces as middle dots (a bare
    space would vanish), a leading combining mark on '◌' (it would join the previous token)."""
    out = []
    blank = text != "" and text.strip(" \n\t\r") == ""
    for j, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ch == " ":
            out.append("\u00b7" if blank else " ")
        elif cat == "Cc":
            out.append(f"\\x{ord(ch):02x}")
        elif cat in _INVISIBLE or (cat == "Mn" and ord(ch) in _SELECTORS):
            out.append(f"\\u{ord(ch):04x}")
        elif j == 0 and cat.startswith("M"):
            out.append("\u25cc" + ch)
        else:
            out.append(ch)
    return "".join(out) if text else "\u2205"


def token_texts(tokens: list[str]) -> list[str]:
    """Every vocabulary entry, visible and escaped, once for all pages."""
    return [esc(visible(t)) for t in tokens]


def fmt(v: float | None, digits: int = 4) -> str:
    return "" if v is None else f"{v:.{digits}g}"


def pct(freq: float) -> str:
    return f"{100 * freq:.3g}%"


def page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="generator" content="{GENERATOR}"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


# ------------------------------------------------------------------------------------------- examples

def shaded_context(ex: dict[str, Any], vis: list[str], latent_max: float) -> str:
    """One window: each token a span, its background alpha = act / the latent's max, its exact act on
    hover; the activating token also outlined."""
    ids, acts, mark = ex["token_ids"], ex.get("acts"), ex.get("mark")
    top = latent_max if latent_max > 0 else 1.0
    parts = []
    for j, tid in enumerate(ids):
        text = vis[tid] if 0 <= tid < len(vis) else esc(f"<id {tid}>")
        a = float(acts[j]) if acts is not None and j < len(acts) else 0.0
        if j == mark and ex.get("activation") is not None:
            a = float(ex["activation"])  # the exact value; acts are rounded to 4 decimals
        cls = ' class="m"' if j == mark else ""
        if a > 0:
            alpha = min(1.0, max(0.05, a / top))  # a faint non-zero firing stays visible
            parts.append(f'<span{cls} style="background:rgba(255,110,0,{alpha:.2f})" title="{a:.6g}">{text}</span>')
        else:
            parts.append(f'<span{cls} title="0">{text}</span>')
    return "".join(parts)


def example_rows(examples: Iterable[dict[str, Any]], vis: list[str], latent_max: float, has_layers: bool) -> str:
    rows = []
    for ex in examples:
        layer = ""
        if has_layers:
            lay = ex.get("layer")
            label = "" if lay is None else f"L{esc(lay)}"
            layer = f'<span class="ly" title="hidden state {esc(lay)}">{label}</span>'
        rows.append(f'<div class="ex"><span class="v">{fmt(ex.get("activation"))}</span>{layer}'
                    f'<span class="ctx">{shaded_context(ex, vis, latent_max)}</span></div>')
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- charts

class _Frame(NamedTuple):
    """An SVG bar chart's opening and axes, and where its plot area lies."""

    parts: list[str]
    w: int
    h: int
    left: int
    top: int
    pw: float
    ph: float
    bw: float


def _bar_frame(css_class: str, label: str, height: int, n_bars: int, peak: int) -> _Frame:
    """The SVG a bar chart starts with: its box, the base line and the 0 / peak labels."""
    w, h, left, bottom, top = 460, height, 40, 24, 8
    pw, ph = w - left - 16, h - bottom - top
    parts = [f'<svg class="{css_class}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{label}">',
             f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
             f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>']
    return _Frame(parts, w, h, left, top, pw, ph, pw / n_bars)


def histogram_svg(hist: list[int], edges: list[float]) -> str:
    """Bars of the non-zero activations' histogram over its log-spaced bins, cut to the bins in use."""
    used = [i for i, c in enumerate(hist) if c]
    if not used:
        return ""
    lo, hi = max(0, used[0] - 2), min(len(hist) - 1, used[-1] + 2)
    bins = hist[lo:hi + 1]
    peak = max(bins)
    f = _bar_frame("hist", "activation histogram", 130, len(bins), peak)
    out, h, left, top, ph, bw = f.parts, f.h, f.left, f.top, f.ph, f.bw
    for j, c in enumerate(bins):
        i = lo + j
        bh = ph * c / peak
        label = f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}"
        out.append(f'<rect x="{left + j * bw + 0.5:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                   f'height="{bh:.1f}" fill="#f08a24"><title>{label}</title></rect>')
    # edge labels: the first and the last edge, and every fifth (half decades) not crowding them
    end_x = left + (hi + 1 - lo) * bw
    last_x = -1e9
    for i in sorted({lo, hi + 1} | {i for i in range(lo, hi + 2) if i % 5 == 0}):
        x = left + (i - lo) * bw
        if i != hi + 1 and (x - last_x < 34 or end_x - x < 34):
            continue
        anchor = "end" if i == hi + 1 else "middle"
        out.append(f'<text x="{x:.1f}" y="{h - 8}" text-anchor="{anchor}">{edges[i]:.3g}</text>')
        last_x = x
    out.append("</svg>")
    return "".join(out)


def layers_svg(counts: list[int], layers: list[int]) -> str:
    """Bars of how many of a latent's activations came from each layer (RouteSAE's routed layer,
    MLSAE's best one)."""
    total = sum(counts)
    if not total:
        return ""
    peak = max(counts)
    f = _bar_frame("layers", "layer distribution", 110, len(counts), peak)
    out, h, left, top, pw, ph, bw = f.parts, f.h, f.left, f.top, f.pw, f.ph, f.bw
    step = max(1, round(len(counts) / (pw / 22)))  # keep the layer labels from running together
    for j, (c, lay) in enumerate(zip(counts, layers)):
        bh = ph * c / peak
        x = left + j * bw
        out.append(f'<rect x="{x + 1:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" '
                   f'fill="#4a78c2"><title>layer {esc(lay)}: {c} ({100 * c / total:.1f}%)</title></rect>')
        if j % step == 0:
            out.append(f'<text x="{x + bw / 2:.1f}" y="{h - 8}" text-anchor="middle">{esc(lay)}</text>')
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------- sections

def tokens_table(title: str, rows: list[tuple[int, float]], vis: list[str]) -> str:
    body = "".join(f'<tr><td class="l"><span class="tok">{vis[t] if 0 <= t < len(vis) else esc(f"<id {t}>")}</span>'
                   f"</td><td>{v:+.3f}</td></tr>" for t, v in rows)
    return f'<div><h3>{esc(title)}</h3><table class="unembed">{body}</table></div>'


def _scores(name: str, s: dict[str, Any] | None) -> str:
    if not isinstance(s, dict):
        return ""
    keys = ("balanced_accuracy", "precision", "recall", "f1")
    parts = [f"{k.replace('_', ' ')} <b>{fmt(s[k], 3) if isinstance(s[k], (int, float)) else 'undefined'}</b>"
             for k in keys if k in s]
    if isinstance(s.get("n"), int):
        parts.append(f"n {s['n']}")
    if s.get("parse_failures"):
        parts.append(f"{esc(s['parse_failures'])} replies did not parse")
    return f"<p><b>{name}</b>: {' · '.join(parts)}</p>"


def judge_section(entry: dict[str, Any] | None) -> str:
    """The interpretation of one latent, from interp.json (formats.md, "interpretations")."""
    if not entry:
        return ""
    parts = ['<section class="judge"><h2>Interpretation</h2>']
    if entry.get("explanation"):
        parts.append(f'<p class="expl"><b>Explanation</b>: {esc(entry["explanation"])}</p>')
    elif entry.get("explanation_reply"):
        parts.append('<p><b>Explanation</b>: the explainer\'s reply did not parse: <span class="muted">'
                     f'{esc(entry["explanation_reply"])}</span></p>')
    paper = entry.get("paper")
    if isinstance(paper, dict):
        if paper.get("parse_failure"):
            parts.append(f'<p><b>Paper judge</b>: the reply did not parse: <span class="muted">'
                         f'{esc(paper.get("reply", ""))}</span></p>')
        else:
            parts.append(f'<p><b>Paper judge</b>: {esc(paper.get("category", "?"))}, score '
                         f'<b>{esc(paper.get("score", "?"))}</b>/5'
                         + (f': {esc(paper["explanation"])}' if paper.get("explanation") else "")
                         + (f' <span class="muted small">(judged on its {esc(paper["source"])} contexts)</span>'
                            if paper.get("source") else "") + "</p>")
    parts.append(_scores("Detection", entry.get("detection")))
    parts.append(_scores("Fuzzing", entry.get("fuzzing")))
    parts.append("</section>")
    return "".join(parts)


class LatentQuality(NamedTuple):
    """What the quality outputs (quality/results.py) say about one latent, for its page."""

    probing: list[Any]
    """ProbingUse: the datasets it serves."""
    partners: list[Any]
    """AbsorptionPartner: its letters and the latents on the other side."""
    probe_k: int | None
    """The smallest k of the probe output(s) for this SAE; None: no probe output covers it."""
    n_datasets: int
    """Datasets probed."""
    absorbed: bool
    """An absorption output covers this SAE."""
    pages: frozenset[int]
    """Latents with a page here (partners link to them)."""


def _latent_link(j: int, pages: frozenset[int]) -> str:
    return f'<a href="{j}.html">{j}</a>' if j in pages else str(j)


def quality_sections(q: LatentQuality | None) -> str:
    """'Probing' (datasets the latent serves, with the probe's test AUC) and 'Absorption partners'."""
    if q is None:
        return ""
    parts = []
    if q.probe_k is not None:
        parts.append("<div><h2>Probing</h2>")
        if q.probing:
            with_layer = any(u.layer is not None for u in q.probing)
            head = '<tr><th class="l">dataset</th><th>k</th><th>test AUC</th>' + ("<th>layer</th>" if with_layer else "")
            body = "".join(f'<tr><td class="l">{esc(u.dataset)}</td><td>{esc(u.k)}</td><td>{fmt(u.auc, 3)}</td>'
                           + (f"<td>{esc('' if u.layer is None else u.layer)}</td>" if with_layer else "") + "</tr>"
                           for u in q.probing)
            parts.append(f'<table class="probing">{head}</tr>{body}</table>')
        else:
            parts.append(f'<p class="muted">Not among the k={esc(q.probe_k)} latents picked for any of the '
                         f"{esc(q.n_datasets)} datasets probed.</p>")
        parts.append(f'<p class="muted small">datasets for which routesae probe picked this latent among the '
                     f"k={esc(q.probe_k)} of largest class-mean difference; test AUC of the probe on them</p></div>")
    if q.absorbed:
        parts.append("<div><h2>Absorption partners</h2>")
        if q.partners:
            rows = []
            for a in q.partners:
                role = "main latent; absorbed by" if a.role == "main" else "absorbs from the main latents"
                links = ", ".join(_latent_link(j, q.pages) for j in a.partners) or "none"
                rows.append(f'<tr><td class="l">{esc(a.letter)}</td><td class="l">{esc(a.site)}</td>'
                            f'<td class="l">{role}</td><td class="l">{links}</td><td>{fmt(a.absorption, 3)}</td></tr>')
            parts.append('<table class="absorption"><tr><th class="l">letter</th><th class="l">site</th>'
                         '<th class="l">role</th><th class="l">latents</th><th>absorption</th></tr>'
                         + "".join(rows) + "</table>")
        else:
            parts.append('<p class="muted">Neither a main latent of a letter nor one that absorbed a letter\'s '
                         "words.</p>")
        parts.append('<p class="muted small">first-letter task (routesae absorption): per letter, its main latents '
                     "and the other latents that carried most of the absorbed share of its words</p></div>")
    return '<div class="cols">' + "".join(parts) + "</div>"


def top_layer(rec: dict[str, Any], layers: list[int] | None) -> int | None:
    """The hidden-states index most of a latent's activations came from (None: no layers, or dead)."""
    counts = rec.get("layers")
    if not layers or not counts or not any(counts):
        return None
    return layers[max(range(len(counts)), key=counts.__getitem__)]


def latent_page(rec: dict[str, Any], ctx: Any, vis: list[str], prev: int | None, nxt: int | None,
                judge: dict[str, Any] | None, unembed: Any, unembed_note: str | None,
                quality: LatentQuality | None = None) -> str:
    """One latent's page. `ctx`: the Contexts being shown (manifest, layers); `unembed`: its
    LatentTokens or None; `quality`: its probing datasets and absorption partners, or None."""
    i = rec["latent"]
    m = ctx.manifest
    layers = m.get("layers")
    name = m.get("sae", {}).get("name", "")
    nav = ['<nav><a href="../index.html">&larr; index</a>',
           f'<a href="{prev}.html" rel="prev">&lsaquo; latent {prev}</a>' if prev is not None else "",
           f'<a href="{nxt}.html" rel="next">latent {nxt} &rsaquo;</a>' if nxt is not None else "", "</nav>"]
    body = ["".join(nav), f'<h1>Latent {i} <span class="muted small">of {esc(name)}</span></h1>']
    count, freq = rec.get("count", 0), rec.get("frequency", 0.0)
    stats = [f"frequency <b>{pct(freq)}</b>", f"count <b>{esc(count)}</b> of {esc(m.get('n_tokens'))} tokens",
             f"max activation <b>{fmt(rec.get('max'))}</b>"]
    lay = top_layer(rec, layers)
    if lay is not None:
        stats.append(f"most frequent layer <b>{esc(lay)}</b>")
    rule = rule_label(m.get("settings") or {})
    verdict = "interpretable" if rec.get("interpretable") else "not counted"
    above = "the threshold" if rule.threshold is None else f"{rule.threshold:g}"
    why = f"{esc(rec.get('paper_distinct', 0))} distinct tokens above {above}"
    if rule.note:  # another threshold: the verdict is not the paper's, and says what the paper's is
        why += f"; {esc(rule.note)}"
    stats.append(f'{esc(rule.scope)}: <b>{verdict}</b> <span class="muted">({why})</span>')
    body.append('<div class="stats">' + "".join(f"<span>{s}</span>" for s in stats) + "</div>")
    body.append(judge_section(judge))
    left, right = [], []
    if not count:
        left.append('<p class="muted">Dead: it never fired on the tokens read.</p>')
    else:
        left.append("<h2>Activation histogram</h2>" + histogram_svg(rec.get("histogram") or [],
                                                                     m["settings"]["histogram_edges"]))
        left.append('<p class="muted small">non-zero activations in log-spaced bins; hover a bar for its range</p>')
        if layers and rec.get("layers"):
            left.append("<h2>Layer distribution</h2>" + layers_svg(rec["layers"], layers))
    if unembed is not None:
        right.append("<h2>Decoder direction, unembedded</h2>"
                     f'<div class="cols">{tokens_table("Top 10 tokens", unembed.top, vis)}'
                     f'{tokens_table("Bottom 10 tokens", unembed.bottom, vis)}</div>'
                     f'<p class="muted small">{esc(unembed_note or "")}</p>')
    elif unembed_note:
        right.append(f'<h2>Decoder direction</h2><p class="muted small">{esc(unembed_note)}</p>')
    body.append('<div class="cols">' + "".join(f"<div>{''.join(c)}</div>" for c in (left, right) if c) + "</div>")
    body.append(quality_sections(quality))
    has_layers = bool(layers)
    peak = float(rec.get("max") or 0.0)
    if rec.get("top"):
        body.append("<h2>Top activations</h2>")
        body.append(example_rows(rec["top"], vis, peak, has_layers))
    quantiles = [q for q in rec.get("quantiles") or [] if q]
    if quantiles:
        body.append('<h2>Quantile examples</h2><p class="muted small">from equal-count quantiles of a uniform sample '
                    "of its activations, lowest first</p>")
        n = len(rec["quantiles"])
        for qi, q in enumerate(rec["quantiles"]):
            if not q:
                continue
            vals = [ex["activation"] for ex in q if ex.get("activation") is not None]
            span = f" ({fmt(min(vals), 3)} to {fmt(max(vals), 3)})" if vals else ""
            body.append(f"<h3>Quantile {qi + 1} of {n}{span}</h3>")
            body.append(example_rows(q, vis, peak, has_layers))
    return page(f"Latent {i} · {name}", "\n".join(b for b in body if b))


# ---------------------------------------------------------------------------------------------- index

def index_page(ctx: Any, rows: list[dict[str, Any]], dead: list[int], interp: dict[str, Any] | None,
               unembed_note: str | None, quality: list[str] | None = None) -> str:
    """The index: one sortable table of the live latents, the dead ones listed apart. `quality`:
    the quality outputs shown (rows then carry 'probing' and 'absorption' lists), or None."""
    m = ctx.manifest
    sae = m.get("sae", {})
    layers = m.get("layers")
    has_judge = interp is not None
    head = [("latent", "Latent", "asc"), ("frequency", "Frequency", "desc"), ("count", "Count", "desc"),
            ("max", "Max act", "desc")]
    if layers:
        head.append(("layer", "Layer", "asc"))
    rule = rule_label(m.get("settings") or {})
    head.append(("rule", esc(rule.column), "desc"))
    if has_judge:
        head += [("score", "Judge score", "desc"), ("detection", "Detection", "desc"), ("fuzzing", "Fuzzing", "desc")]
    if quality is not None:
        head += [("probing", "Probing", "desc"), ("absorption", "Absorption", "desc")]
    ths = "".join(f'<th data-k="{k}" data-d="{d}">{label}</th>' for k, label, d in head)
    ths += '<th class="l">Top token</th>' + ('<th class="l">Explanation</th>' if has_judge else "")
    trs = []
    for r in rows:
        i = r["latent"]
        cells = [f'<td data-v="{i}"><a href="latents/{i}.html">{i}</a></td>',
                 f'<td data-v="{r["frequency"]:.6g}">{pct(r["frequency"])}</td>',
                 f'<td data-v="{r["count"]}">{r["count"]}</td>',
                 f'<td data-v="{r["max"]:.6g}">{fmt(r["max"])}</td>']
        if layers:
            lay = r.get("layer")
            lay = "" if lay is None else esc(lay)
            cells.append(f'<td data-v="{lay}">{lay}</td>')
        cells.append(f'<td data-v="{int(bool(r["interpretable"]))}">{"&#10003;" if r["interpretable"] else ""}</td>')
        if has_judge:
            for key in ("score", "detection", "fuzzing"):
                v = r.get(key)
                cells.append(f'<td data-v="{"" if v is None else f"{v:.6g}"}">{fmt(v, 3)}</td>')
        if quality is not None:  # datasets served / letters taken part in; sorted by their count
            for key in ("probing", "absorption"):
                items = r.get(key) or []
                cells.append(f'<td class="l small" data-v="{len(items)}">{esc(", ".join(items))}</td>')
        token = f'<span class="tok">{r["token"]}</span>' if r.get("token") else ""
        cells.append(f'<td class="l">{token}</td>')
        if has_judge:
            cells.append(f'<td class="l">{esc(r.get("explanation") or "")}</td>')
        trs.append("<tr>" + "".join(cells) + "</tr>")
    n_lat = len(rows) + len(dead)
    pr = m.get("paper_rule") or {}
    store = m.get("store", {})
    info = [f"arch <b>{esc(sae.get('arch'))}</b>", f"k <b>{esc(sae.get('k'))}</b>",
            f"{esc(sae.get('n_latents'))} latents", f"{esc(m.get('n_tokens'))} tokens read (store tokens "
            f"{esc(m.get('tokens', ['?', '?'])[0])} to {esc(m.get('tokens', ['?', '?'])[1])})",
            f"<b>{esc(pr.get('interpretable', '?'))}</b> "
            + (f"interpretable by {esc(rule.name)} (activation above {rule.threshold:g})" if rule.paper
               else esc(rule.name))]
    if layers:
        info.append(f"layers {esc(layers[0])} to {esc(layers[-1])}")
    body = [f'<h1>{esc(sae.get("name", ""))} <span class="muted small">feature dashboard</span></h1>',
            '<div class="stats">' + "".join(f"<span>{s}</span>" for s in info) + "</div>",
            f'<p class="muted small">SAE {esc(sae.get("path", ""))} · store {esc(store.get("path", ""))} · '
            f'contexts {esc(ctx.folder)}</p>']
    if has_judge:
        body.append(_summary(interp))
    body.append(f'<p>Showing <b>{len(rows)}</b> live latents of the {n_lat} here ({len(dead)} dead, '
                '<a href="#dead">listed below</a>). Click a column to sort, again to reverse.</p>'
                '<p><input type="search" id="filter" placeholder="filter rows (token, explanation)" '
                f'aria-label="filter"> <span class="muted small"><span id="shown">{len(rows)}</span> shown</span></p>')
    body.append(f'<table id="latents"><thead><tr>{ths}</tr></thead><tbody>\n' + "\n".join(trs) + "\n</tbody></table>")
    body.append(f'<h2 id="dead">Dead latents ({len(dead)})</h2>')
    if dead:
        body.append('<p class="muted small">never fired on the tokens read</p><p class="dead">'
                    + " ".join(f'<a href="latents/{i}.html">{i}</a>' for i in dead) + "</p>")
    else:
        body.append('<p class="muted">none</p>')
    if unembed_note:
        body.append(f'<p class="muted small">Decoder tokens: {esc(unembed_note)}</p>')
    if quality is not None:
        body.append('<p class="muted small">Probing: the datasets a latent was picked for (routesae probe, smallest k); '
                    "Absorption: the letters where it is a main latent (main) or absorbed the letter's words (abs.). "
                    f"From {esc(', '.join(quality))}.</p>")
    return page(f"{sae.get('name', '')} · feature dashboard", "\n".join(body), INDEX_JS)


def _summary(interp: dict[str, Any]) -> str:
    judge = interp.get("judge") or {}
    s = interp.get("summary") or {}
    parts = [f"judge <b>{esc(judge.get('model', '?'))}</b>",
             f"protocols {esc(', '.join(map(str, interp.get('protocols') or [])))}",
             f"{esc(len(interp.get('latents') or {}))} latents interpreted"]
    paper = s.get("paper") or {}
    if isinstance(paper.get("mean_score"), (int, float)):
        parts.append(f"mean paper score <b>{paper['mean_score']:.3g}</b>")
    for key in ("detection", "fuzzing"):
        v = (s.get(key) or {}).get("balanced_accuracy")
        if isinstance(v, (int, float)):
            parts.append(f"{key} balanced accuracy <b>{v:.3g}</b>")
    return '<div class="stats judge">' + "".join(f"<span>{p}</span>" for p in parts) + "</div>"
