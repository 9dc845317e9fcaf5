"""Feature absorption on the first-letter task (Chanin et al. 2024, arXiv 2409.14507), scored as
SAEBench's absorption eval does: the probe, each letter's main latents, and the absorption fraction.

1. Probe: 26 one-vs-rest logistic regressions for the first letter on the residual at the SAE's
   layer, fitted on the train words. In place of SAEBench's Adam-trained BCE probe (pos_weight
   neg/pos, 50 epochs) this is scikit-learn's LogisticRegression with class_weight='balanced' (the
   same reweighting) on standardized inputs, folded back into a probe on the raw residual. Its F1
   per letter on the test words is reported beside every figure; letters below `min_probe_f1`
   (SAEBench's 0.6) are left out and listed, as are letters with too few words to fit.
2. Main latents per letter, by k-sparse probing on the SAE's code of the train words: latents
   ranked by the class-mean difference of their activation (letter minus the rest; SAEBench ranks
   by an L1 probe's weights, which on a wide dictionary costs a long fit per letter), then a
   balanced logistic regression on the top k, k = 1, 2, ...; k grows while its test F1 rises by
   more than `min_f1_gain` (0.03). The last set kept are the main latents.
3. Per test word of a known letter that the probe scores positive, with p̂ the probe's unit
   direction: P = x·p̂; s_i = latent i's share of the reconstruction along p̂ (a_i·cos(W_dec_i, p̂)
   for unit decoder rows on an unnormalized input, as SAEBench assumes; here a_i·|W_dec_i|·cos
   times the factor the SAE's normalization divided the input by, and x less the normalization's
   shift, so any decoder norm and any normalization give model-space figures); M = sum of s over
   the main latents; A = sum of the top 3 s among the other latents with cos >= 0.1 and s > 0.
   Fraction: 0 if P <= 0, M >= P or A/P < 0.4; 1 if M <= 0; else a/(a+M), a = min(A, P-M).
   Full absorption: every main latent below 1e-8, the top-s other latent with cos >= 0.025 and
   s/P >= 0.4. Per letter: sums over the probe's true positives, divided by their count; overall:
   the mean over the known letters.

Multi-layer SAEs (SAEBench and sae-probes encode one hook only; this adaptation is routesae's):
- RouteSAE: its routed code; per word, the residual of the layer the router chose and the probe of
  that layer; s_i divides the routing weight p back out (the coder read p·x_norm). Soft routing
  has no single layer per word and is refused.
- MLSAE: every routed layer on its own (the code its single-layer view gives there, all layers from
  one encode; that layer's probe);
  the SAE's figure is the mean over its layers, each layer's row is reported too.
- Crosscoder: its one code, scored at every layer it reads against that layer's decoder block and
  probe; the SAE's figure is the mean over its layers, each layer reported.
Caveats (SAEBench's): small models know first letters poorly (SmolLM2-135M: see the probe F1), and
small or briefly trained SAEs can look falsely good.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from routesae.errors import RouteSAEError

LETTERS = tuple(string.ascii_lowercase)


@dataclass
class AbsorptionSettings:
    """The thresholds of the metric (SAEBench's defaults)."""

    min_probe_f1: float = 0.6
    """Letters whose probe F1 on the test words is below this are left out."""
    min_letters: int = 1
    """Fewest known letters to score; fewer is an error."""
    min_words: int = 2
    """Fewest train words and test words a letter needs (each split) to be fitted."""
    max_k: int = 10
    """Largest k tried for the main latents."""
    min_f1_gain: float = 0.03
    """k grows while the k-sparse probe's F1 rises by more than this."""
    min_cos: float = 0.1
    """Other latents count toward A only with cos(W_dec, p̂) at least this."""
    top_absorbing: int = 3
    """A sums the top this many other latents."""
    min_absorption_share: float = 0.4
    """A/P below this is no absorption; the full-absorption latent's s/P must reach it."""
    full_min_cos: float = 0.025
    """The full-absorption latent's cos with p̂ must reach this."""
    silent: float = 1e-8
    """A main latent below this is silent."""
    seed: int = 0
    """Seeds the logistic regressions."""


class LetterProbe(NamedTuple):
    """The one-vs-rest first-letter probe at one layer, on the raw residual."""

    letters: list[str]
    """The letters it was fitted for (enough words in both splits)."""
    weight: np.ndarray
    """[n_letters, d_model] float64: score = x·weight + bias."""
    bias: np.ndarray
    """[n_letters] float64."""
    f1: np.ndarray
    """[n_letters] F1 of score > 0 on the test words."""

    def direction(self, letter: str) -> np.ndarray:
        w = self.weight[self.letters.index(letter)]
        return w / max(float(np.linalg.norm(w)), 1e-30)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """[n, d] -> [n, n_letters]."""
        return x.astype(np.float64) @ self.weight.T + self.bias


def _fit_balanced(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    """A class-balanced logistic regression fitted on (x, y); an unconverged fit is kept quietly
    (lbfgs's 1,000 iterations; the F1 reported beside it says how good it is)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(class_weight="balanced", max_iter=1000, random_state=seed).fit(x, y)


def fittable_letters(train_letters: list[str], test_letters: list[str], min_words: int) -> list[str]:
    """Letters with at least min_words words in each split."""
    return [c for c in LETTERS if train_letters.count(c) >= min_words and test_letters.count(c) >= min_words]


def fit_letter_probe(x_train: np.ndarray, y_train: list[str], x_test: np.ndarray, y_test: list[str],
                     settings: AbsorptionSettings) -> LetterProbe:
    """26 (or fewer: the fittable letters) balanced one-vs-rest logistic regressions."""
    from sklearn.metrics import f1_score

    letters = fittable_letters(y_train, y_test, settings.min_words)
    x_train = x_train.astype(np.float64)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6  # standardized for the fit; folded back below
    z_train = (x_train - mu) / sd
    ytr, yte = np.array(y_train), np.array(y_test)
    weight = np.zeros((len(letters), x_train.shape[1]))
    bias = np.zeros(len(letters))
    for j, c in enumerate(letters):
        lr = _fit_balanced(z_train, ytr == c, settings.seed)
        weight[j] = lr.coef_[0] / sd
        bias[j] = lr.intercept_[0] - float((lr.coef_[0] * mu / sd).sum())
    probe = LetterProbe(letters, weight, bias, np.zeros(len(letters)))
    pred = probe.scores(x_test) > 0
    f1 = np.array([f1_score(yte == c, pred[:, j], zero_division=0.0) for j, c in enumerate(letters)])
    return probe._replace(f1=f1)


class MainLatents(NamedTuple):
    """One letter's main latents."""

    latents: list[int]
    """The latents kept (the top k by class-mean difference)."""
    f1: list[float]
    """Test F1 of the k-sparse probe for k = 1, 2, ... as tried."""


def main_latents(codes_train: np.ndarray, is_letter_train: np.ndarray, codes_test: np.ndarray,
                 is_letter_test: np.ndarray, settings: AbsorptionSettings) -> MainLatents:
    """k-sparse probing: rank latents by mean code on the letter's words minus on the others; k
    grows while the balanced probe's test F1 rises by more than settings.min_f1_gain."""
    from sklearn.metrics import f1_score

    pos, neg = codes_train[is_letter_train], codes_train[~is_letter_train]
    diff = pos.mean(0) - neg.mean(0)
    ranked = np.argsort(-diff, kind="stable")[:settings.max_k]
    kept: list[int] = []
    f1s: list[float] = []
    for k in range(1, len(ranked) + 1):
        top = ranked[:k]
        if not codes_train[:, top].any():  # nothing fires: no probe to fit
            f1 = 0.0
        else:
            lr = _fit_balanced(codes_train[:, top], is_letter_train, settings.seed)
            f1 = float(f1_score(is_letter_test, lr.predict(codes_test[:, top]), zero_division=0.0))
        if k > 1 and f1 - f1s[-1] <= settings.min_f1_gain:
            f1s.append(f1)
            break
        f1s.append(f1)
        kept = [int(i) for i in top]
    return MainLatents(kept, f1s)


class WordAbsorption(NamedTuple):
    """The absorption of the test words of one letter that the probe scores positive."""

    fraction: np.ndarray
    """[n] absorption fraction in [0, 1]."""
    full: np.ndarray
    """[n] bool: fully absorbed by one latent."""


def absorption_of_words(P: np.ndarray, codes: np.ndarray, proj: np.ndarray, cos: np.ndarray, main: list[int],
                        settings: AbsorptionSettings) -> WordAbsorption:
    """SAEBench's absorption fraction and full absorption per word.

    P [n]: the residual's projection on p̂; codes [n, m]: the SAE's code; proj [n, m]: each latent's
    share of the reconstruction along p̂ (s_i = proj_i, already times a_i); cos [n, m] or [m]: each
    latent's decoder cosine with p̂; main: the letter's main latents."""
    n, m = codes.shape
    cos = np.broadcast_to(cos, (n, m))
    is_main = np.zeros(m, dtype=bool)
    is_main[main] = True
    s = proj
    M = s[:, is_main].sum(1)
    others = np.where((~is_main)[None, :] & (cos >= settings.min_cos) & (s > 0), s, 0.0)
    top = min(settings.top_absorbing, m)
    A = -np.sort(-others, axis=1)[:, :top].sum(1) if top else np.zeros(n)
    safe_P = np.where(P > 0, P, 1.0)
    a = np.minimum(A, P - M)
    fraction = np.where(M <= 0, 1.0, a / np.where(a + M > 0, a + M, 1.0))
    none = (P <= 0) | (M >= P) | (A / safe_P < settings.min_absorption_share)
    fraction = np.where(none, 0.0, fraction)

    main_silent = (codes[:, is_main] < settings.silent).all(1) if is_main.any() else np.ones(n, dtype=bool)
    s_others = np.where((~is_main)[None, :], s, -np.inf)
    best = s_others.argmax(1)
    rows = np.arange(n)
    best_s, best_cos = s_others[rows, best], cos[rows, best]
    # SAEBench asks P >= 0; P = 0 leaves s/P undefined, so it counts as no absorption here
    full = (main_silent & (best_cos >= settings.full_min_cos) & (P > 0)
            & (best_s / safe_P >= settings.min_absorption_share))
    return WordAbsorption(np.clip(fraction, 0.0, 1.0), full)


class Site(NamedTuple):
    """What the metric reads of one SAE at one place, for one word set: its code, how each latent
    writes into the residual there, and which layer's probe judges each word."""

    codes: np.ndarray
    """[n, m] the SAE's code of each word."""
    residual: np.ndarray
    """[n, d] the word's residual there, model space, less the normalization's shift."""
    scale: np.ndarray
    """[n] model-space units per unit of code: the normalization's std (RouteSAE: divided by p)."""
    decoder: np.ndarray
    """[m, d] each latent's decoder row at this place."""
    layer: np.ndarray
    """[n] hidden_states layer whose probe judges each word."""


def _probe_per_word(site: Site, probes: dict[int, LetterProbe], letter: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (probe score [n], unit direction per word [n, d]) of `letter`, each word by its layer's probe."""
    n, d = site.residual.shape
    score = np.zeros(n)
    direction = np.zeros((n, d))
    for layer in np.unique(site.layer):
        rows = site.layer == layer
        probe = probes[int(layer)]
        j = probe.letters.index(letter)
        score[rows] = site.residual[rows].astype(np.float64) @ probe.weight[j] + probe.bias[j]
        direction[rows] = probe.direction(letter)
    return score, direction


def site_probe_f1(site: Site, probes: dict[int, LetterProbe], labels: list[str], letter: str) -> float:
    """F1 on these words of the probe(s) a site uses: the layer's probe, or each word's routed layer's."""
    from sklearn.metrics import f1_score

    layers = np.unique(site.layer)
    if len(layers) == 1:
        probe = probes[int(layers[0])]
        return float(probe.f1[probe.letters.index(letter)])
    score, _ = _probe_per_word(site, probes, letter)
    return float(f1_score(np.array(labels) == letter, score > 0, zero_division=0.0))


class LetterResult(NamedTuple):
    """One letter's figures at one site."""

    letter: str
    probe_f1: float
    """The probe's F1 on the test words (judged at the site's layer, or each word's routed layer)."""
    test_words: int
    """Test words of this letter."""
    true_positives: int
    """Those the probe scores positive: the words absorption is measured on."""
    main_latents: list[int]
    main_f1: list[float]
    """k-sparse probe F1 per k tried."""
    absorption: float
    """Mean absorption fraction over the true positives."""
    full_absorption: float
    """Share of the true positives fully absorbed."""
    absorbing_latents: list[int]
    """The other latents that carried the most of the absorbed share (up to 5), strongest first."""


def score_site(train: Site, test: Site, y_train: list[str], y_test: list[str], probes: dict[int, LetterProbe],
               letters: list[str], settings: AbsorptionSettings) -> list[LetterResult]:
    """Main latents and absorption of each letter at one site."""
    ytr, yte = np.array(y_train), np.array(y_test)
    norms = np.linalg.norm(test.decoder, axis=1)
    unit = test.decoder / np.maximum(norms, 1e-30)[:, None]
    out = []
    for letter in letters:
        main = main_latents(train.codes, ytr == letter, test.codes, yte == letter, settings)
        score, direction = _probe_per_word(test, probes, letter)
        tp = (score > 0) & (yte == letter)
        idx = np.flatnonzero(tp)
        absorbing: list[int] = []
        if len(idx):
            cos = direction[idx] @ unit.T  # [n_tp, m]
            codes = test.codes[idx].astype(np.float64)
            proj = codes * norms[None, :] * cos * test.scale[idx, None]
            P = (test.residual[idx].astype(np.float64) * direction[idx]).sum(1)
            word = absorption_of_words(P, codes, proj, cos, main.latents, settings)
            frac, full = float(word.fraction.mean()), float(word.full.mean())
            absorbed = word.fraction > 0
            if absorbed.any():
                others = proj[absorbed].copy()
                others[:, main.latents] = 0
                total = np.clip(others, 0, None).sum(0)
                absorbing = [int(i) for i in np.argsort(-total, kind="stable")[:5] if total[i] > 0]
        else:
            frac = full = 0.0
        out.append(LetterResult(letter, site_probe_f1(test, probes, y_test, letter), int((yte == letter).sum()),
                                int(tp.sum()), main.latents, [round(f, 4) for f in main.f1], frac, full, absorbing))
    return out


# --- the SAE's sites ---------------------------------------------------------------------------------
def sae_sites(sae: Any, residuals: dict[int, np.ndarray]) -> list[tuple[str, Site]]:
    """The places an SAE is scored, each named ('layer 6', 'routed over 4..8'), from the words'
    residuals (layer -> [n, d]); see the module docstring for each architecture."""
    import torch

    layers = list(sae.config.layers)
    n = next(iter(residuals.values())).shape[0]
    W_dec = sae.coder.W_dec.detach().float().cpu().numpy()
    d = sae.config.d_model
    with torch.no_grad():
        if hasattr(sae, "route"):
            if sae.config.routing != "hard":
                raise RouteSAEError(f"{sae.config.arch} with {sae.config.routing} routing mixes layers per word: "
                                    "absorption needs one layer per word (hard routing)")
            x = torch.from_numpy(np.stack([residuals[layer] for layer in layers], axis=1))
            codes = sae.encode(x).float().cpu().numpy()
            route = sae.route(x)
            li, p = route.layer_index.cpu().numpy(), route.weight.float().cpu().numpy()
            _, mean, std = sae.normalize_input(x)
            mean = mean.squeeze(-1).cpu().numpy()[np.arange(n), li]
            std = std.squeeze(-1).expand(n, len(layers)).cpu().numpy()[np.arange(n), li]
            picked = x.numpy()[np.arange(n), li]
            site = Site(codes, picked - mean[:, None], std / p, W_dec, np.array(layers)[li])
            return [(f"routed over {layers[0]}..{layers[-1]}", site)]
        if getattr(sae, "multi_layer", False):
            codes, mean, std = _stacked_encode(sae, residuals, layers)
            if hasattr(sae, "at_layer"):  # MLSAE: a code per layer (token-major), its one decoder
                per_layer = codes.reshape(n, len(layers), -1)
                return [(f"layer {layer}", Site(per_layer[:, j], residuals[layer] - mean[:, j:j + 1], std[:, j], W_dec,
                                                np.full(n, layer)))
                        for j, layer in enumerate(layers)]
            # crosscoder: one code, each layer's decoder block
            return [(f"layer {layer}", Site(codes, residuals[layer] - mean[:, j:j + 1], std[:, j],
                                            W_dec[:, j * d:(j + 1) * d], np.full(n, layer)))
                    for j, layer in enumerate(layers)]
        return [(f"layer {layers[0]}", _single_site(sae, layers[0], residuals[layers[0]], W_dec))]


def _stacked_encode(sae: Any, residuals: dict[int, np.ndarray], layers: list[int]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A multi-layer SAE's one encode of every layer: (codes as `encode` returns them, the
    normalization's mean and std per word and layer, [n, n_layers] each)."""
    import torch

    x = torch.from_numpy(np.stack([residuals[layer] for layer in layers], axis=1))
    codes = sae.encode(x).float().cpu().numpy()
    _, mean, std = sae.normalize_input(x)
    n = x.shape[0]
    return (codes, mean.squeeze(-1).expand(n, len(layers)).cpu().numpy(),
            std.squeeze(-1).expand(n, len(layers)).cpu().numpy())


def _single_site(sae: Any, layer: int, x: np.ndarray, W_dec: np.ndarray) -> Site:
    import torch

    xt = torch.from_numpy(x)
    codes = sae.encode(xt).float().cpu().numpy()
    _, mean, std = sae.normalize_input(xt)
    n = x.shape[0]
    mean = mean.expand(n, 1).cpu().numpy()
    std = std.expand(n, 1).cpu().numpy()[:, 0]
    return Site(codes, x - mean, std, W_dec, np.full(n, layer))


class SiteResult(NamedTuple):
    """One SAE's figures at one site."""

    site: str
    """'layer 6', 'routed over 4..8'."""
    letters: list[LetterResult]
    """The known letters, scored."""
    left_out: dict[str, float | None]
    """Letters left out -> the probe's F1 there (None: too few words to fit a probe)."""
    absorption: float
    """Mean absorption fraction over the known letters."""
    full_absorption: float
    """Mean full-absorption rate over the known letters."""
    probe_f1: float
    """Mean probe F1 over the known letters."""


def score_sae(sae: Any, name: str, train: dict[int, np.ndarray], test: dict[int, np.ndarray], y_train: list[str],
              y_test: list[str], probes: dict[int, LetterProbe], settings: AbsorptionSettings) -> list[SiteResult]:
    """Every site of an SAE (see `sae_sites`), scored on the known letters; a one-line error where
    fewer than settings.min_letters letters are known."""
    results = []
    for (site_name, tr), (_, te) in zip(sae_sites(sae, train), sae_sites(sae, test)):
        used = [probes[int(layer)] for layer in np.unique(te.layer)]
        fitted = [c for c in LETTERS if all(c in p.letters for p in used)]
        f1 = {c: site_probe_f1(te, probes, y_test, c) for c in fitted}
        known = [c for c in fitted if f1[c] >= settings.min_probe_f1]
        left_out: dict[str, float | None] = {c: (round(f1[c], 4) if c in f1 else None)
                                              for c in LETTERS if c not in known}
        if len(known) < settings.min_letters:
            best = max(f1.items(), key=lambda kv: kv[1], default=None)
            best_txt = f"best F1 {best[1]:.2f} for '{best[0]}'" if best else "no letter has enough words to fit"
            raise RouteSAEError(
                f"{name} at {site_name}: the first-letter probe knows {len(known)} letters ({best_txt}; threshold "
                f"{settings.min_probe_f1:g}, at least {settings.min_letters} needed): absorption cannot be scored; "
                "lower --min-probe-f1 to see the figures anyway"
            )
        letters = score_site(tr, te, y_train, y_test, probes, known, settings)
        results.append(SiteResult(site_name, letters, left_out,
                                  float(np.mean([r.absorption for r in letters])),
                                  float(np.mean([r.full_absorption for r in letters])),
                                  float(np.mean([r.probe_f1 for r in letters]))))
    return results
