"""An SAE as the equations all four toolkits share, between a foreign file and a routesae folder.

    x' = x - b_dec if subtracts_b_dec else x          (x in the SAE's input space)
    relu:     f = ReLU(x' W_enc + b_enc)
    topk:     f = the k largest of (x' W_enc + b_enc), ReLU'd, the rest 0
    jumprelu: pre = x' W_enc + b_enc; f = ReLU(pre) * 1[pre > threshold]
    gated:    f = 1[x' W_enc + b_gate > 0] * ReLU(exp(r_mag) * (x' W_enc) + b_mag)
    x_hat = f W_dec + b_dec

W_enc is [d_in, d_sae] and W_dec [d_sae, d_in] (SAELens's orientation, which routesae's
export_tensors also use). routesae's coders always subtract b_dec first, so an SAE that does not is
converted by folding: b_enc + b_dec W_enc (and b_gate likewise, b_mag + exp(r_mag) * b_dec W_enc),
computed in float64. A negative JumpReLU threshold acts as 0 (ReLU(pre) is 0 below 0 anyway), so
thresholds are clamped at 0, where routesae's pre * 1[pre > theta] is the same function."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

KINDS = ("relu", "topk", "jumprelu", "gated")
ARCH_OF_KIND = {"relu": "vanilla", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
"""The routesae architecture an SAE of each kind becomes."""


@dataclass
class PortableSAE:
    """Weights and equations of one SAE, float32, in the orientation above."""

    kind: str
    W_enc: Tensor
    """[d_in, d_sae]."""
    W_dec: Tensor
    """[d_sae, d_in]."""
    b_dec: Tensor
    """[d_in]."""
    subtracts_b_dec: bool
    b_enc: Tensor | None = None
    """[d_sae] (not gated)."""
    threshold: Tensor | None = None
    """[d_sae] (jumprelu)."""
    b_gate: Tensor | None = None
    b_mag: Tensor | None = None
    r_mag: Tensor | None = None
    k: int | None = None
    """topk only."""

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def with_b_dec_subtracted(self) -> "PortableSAE":
        """The same function, written with x' = x - b_dec (routesae's form)."""
        if self.subtracts_b_dec:
            return self
        shift = (self.b_dec.double() @ self.W_enc.double())  # [d_sae]: what x' W_enc lacks against x W_enc
        if self.kind == "gated":
            return replace(
                self, subtracts_b_dec=True,
                b_gate=(self.b_gate.double() + shift).float(),  # type: ignore[union-attr]
                b_mag=(self.b_mag.double() + self.r_mag.double().exp() * shift).float(),  # type: ignore[union-attr]
            )
        return replace(self, subtracts_b_dec=True, b_enc=(self.b_enc.double() + shift).float())  # type: ignore[union-attr]

    def scaled_input(self, scale: float) -> "PortableSAE":
        """The SAE that takes x and gives x_hat where this one takes x * scale and gives x_hat * scale:
        SAELens's fold_activation_norm_scaling_factor (W_enc * scale, W_dec / scale, b_dec / scale),
        right with or without the b_dec subtraction: (x - b_dec / s) (W_enc s) = (x s - b_dec) W_enc."""
        return replace(
            self,
            W_enc=(self.W_enc.double() * scale).float(),
            W_dec=(self.W_dec.double() / scale).float(),
            b_dec=(self.b_dec.double() / scale).float(),
        )

    def routesae_tensors(self) -> dict[str, Tensor]:
        """The weights under routesae's export names for ARCH_OF_KIND[kind] (b_dec subtracted first)."""
        p = self.with_b_dec_subtracted()
        out = {"W_enc": p.W_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
        if p.kind == "gated":
            out.update(b_gate=p.b_gate, b_mag=p.b_mag, r_mag=p.r_mag)  # type: ignore[arg-type]
        else:
            out["b_enc"] = p.b_enc  # type: ignore[assignment]
        if p.kind == "jumprelu":
            out["threshold"] = p.threshold.clamp_min(0.0)  # type: ignore[union-attr]
        return {name: t.contiguous() for name, t in out.items()}


def from_routesae_tensors(kind: str, tensors: dict[str, Tensor], k: int | None) -> PortableSAE:
    """A routesae coder's export_tensors() as a PortableSAE (b_dec subtracted, as all routesae coders do)."""
    get = {name: t.detach().float().contiguous() for name, t in tensors.items()}
    return PortableSAE(
        kind=kind, W_enc=get["W_enc"], W_dec=get["W_dec"], b_dec=get["b_dec"], subtracts_b_dec=True,
        b_enc=get.get("b_enc"), threshold=get.get("threshold") if kind == "jumprelu" else None,
        b_gate=get.get("b_gate"), b_mag=get.get("b_mag"), r_mag=get.get("r_mag"), k=k if kind == "topk" else None,
    )
