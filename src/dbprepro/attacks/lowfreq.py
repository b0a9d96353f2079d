"""A low-frequency attack (DiffBreak-style, issue 17): PGD whose perturbation lives in the span of
the lowest 2-D DCT-II frequencies of each channel.

Why low frequencies.  DiffBreak (Kassis et al., arXiv 2411.16598, section 5) argues that a
perturbation of independent pixels is diluted by the purifier's white noise and flips only some
purification paths, while a spatially correlated, low-frequency change shifts the whole
distribution of purified outputs, majority votes included.  Its own LF attack learns a chain of
per-pixel filters under an LPIPS bound (Adam on a margin loss).  This module is **not** that
attack: it is the DCT-subspace variant issue 17 asks for, under the run's own L-inf / L2 threat
model (``attacks.threat_models``), so its robust accuracy sits in the waterfall beside PGD's at the
same radius.

The band.  Per channel, an orthonormal 2-D DCT-II, X = D_H x D_W^T (:func:`dct2`); the band keeps
the frequencies (u, v) with u < k_H and v < k_W, k = ceil(fraction x side) per side
(:func:`band_sides`).  The orthogonal projector onto the band is x -> B_H^T B_H x B_W^T B_W, B = the
first k rows of D (:func:`lowpass`).  ``fraction`` (``attacks.lowfreq.fraction``) defaults to 0.25,
the coarse quarter of the spectrum on each axis: 1/16 of the basis, 8 x 8 of CIFAR-10's 32 x 32
frequencies, so no kept basis image changes sign faster than every side / (k - 1) pixels (4.6 on
32 x 32) - the spatially correlated regime of DiffBreak's argument - while the attack keeps 64
directions per channel to follow the gradient in.  On the 8 x 8 digits it keeps 2 x 2 (the mean, one horizontal,
one vertical and one mixed half-cosine per channel), a very coarse band: raise ``fraction`` there to
trade band for strength.  1.0 keeps every frequency and the attack *is* PGD (below).

One step (PGD's update, :class:`~dbprepro.attacks.pgd.PGD`: same draws, EOT, restarts, random
start, loss and tracking; only :meth:`LowFreq._direction` and :meth:`LowFreq._project` differ):

1. the gradient is projected onto the band, g_b = P g, then PGD's ascent direction is taken: sign(g_b)
   (L-inf) or g_b / ||g_b||_2 (L2).  The step is an ascent direction inside the band: after step 2's
   low-pass, <P sign(P g), g> = ||P g||_1 > 0;
2. the feasible perturbation: low-pass (P delta), then the radial rescale delta <- delta x min(1,
   eps / ||delta||) in the threat model's norm.  The rescale keeps delta exactly in the band *and* in
   the ball, and leaves a feasible delta unchanged.  For L2 this is the exact orthogonal projection onto
   band and ball (the ball is isotropic: the out-of-band part is orthogonal to every feasible point).
   For L-inf the orthogonal projection onto the intersection has no closed form (a quadratic
   programme); clipping each pixel to [-eps, eps] would leave the band, so the rescale is used - a
   feasible projection, not the nearest point;
3. x + delta is clipped to [0, 1], as PGD does (it only shrinks |delta| pixel by pixel: the ball still
   holds), and the clip is accepted: it can put some energy outside the band where a pixel saturates.  Keeping the band exactly would need a scale t with
   x + t delta in [0, 1], which is 0 as soon as a low-frequency delta is negative on one black pixel
   (the digits' background is exactly 0): the attack would never move.  The next step low-passes the
   clipped delta again, so the out-of-band part never accumulates; the final perturbation's share of
   energy outside the band is recorded per image (column ``lowfreq_outside``, 0 when no pixel clipped).
   It is not small on the digits, 58 % of whose pixels are 0 or 1: on the first 64 images of
   scikit-learn's digits, with a linear stand-in classifier, 20 steps at L-inf 0.2 left 13 % of the
   energy outside the band on average (at most 48 %) at fraction 0.25, 5 % (10 %) at 0.5, 1 % (3 %)
   at 0.75.

With the full band (k = side for both axes, e.g. ``fraction`` 1.0) both hooks are PGD's own, so the
attack reproduces PGD bit for bit (tests/test_lowfreq.py); the low-pass adds no network call, so its
cost (:meth:`LowFreq.calls_per_image`) is PGD's for the same steps and EOT.

Config ``attacks.lowfreq``: where it runs (``enabled``, ``settings``, ``threat_models``,
``defenses``, ``n_images``, as the other issue-17 attacks), ``fraction``, and ``steps`` / ``eot``
(null: ``attacks.pgd``'s; ``random_start``, ``restarts``, ``eot_chunk`` are always ``attacks.pgd``'s).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..calls import Calls
from .base import AttackResult, Norm, ascent_direction
from .pgd import PGD, pgd_section, result_columns
from .protocols import Setting
from .registry import register_attack

#: default share of each side's DCT frequencies kept (the schema's default)
FRACTION = 0.25


# torch has no DCT (torch.fft offers only Fourier transforms; scipy.fft.dctn would take the tensors off
# the device and out of the graph), and the images are small (8 x 8 digits, 32 x 32 CIFAR-10): an
# explicit orthonormal DCT-II matrix applied by two matmuls is exact, differentiable and cheap.
@lru_cache(maxsize=32)
def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II matrix D [n, n]: D[u, i] = c_u cos(pi (2 i + 1) u / (2 n)), c_0 =
    sqrt(1 / n), c_u = sqrt(2 / n); coefficients X = D x, inverse x = D^T X (D D^T = I).  Built in
    float64, then cast."""
    with torch.inference_mode(False):  # cached: a normal tensor even if first built in inference mode
        return _dct(n).to(dtype=dtype, device=device)


def _dct(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d


def _mats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    return dct_matrix(h, x.dtype, x.device), dct_matrix(w, x.dtype, x.device)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two axes (each channel of each image)."""
    dh, dw = _mats(x)
    return dh @ x @ dw.T


def idct2(X: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (the transpose: the transform is orthonormal)."""
    dh, dw = _mats(X)
    return dh.T @ X @ dw


def band_sides(h: int, w: int, fraction: float) -> tuple[int, int]:
    """(k_H, k_W): the frequencies u < k_H, v < k_W kept, k = ceil(fraction x side), at least 1
    (a 1e-9 slack: 0.3 x 10 is 3.0000000000000004 in floating point)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return tuple(max(1, math.ceil(fraction * n - 1e-9)) for n in (h, w))


def band_mask(h: int, w: int, fraction: float) -> torch.Tensor:
    """Boolean [h, w]: True on the kept DCT frequencies (u < k_H, v < k_W)."""
    kh, kw = band_sides(h, w, fraction)
    m = torch.zeros(h, w, dtype=torch.bool)
    m[:kh, :kw] = True
    return m


def lowpass(x: torch.Tensor, band: tuple[int, int]) -> torch.Tensor:
    """The orthogonal projection of ``x`` [..., H, W] onto the band (k_H, k_W):
    B_H^T (B_H x B_W^T) B_W with B the first k rows of the DCT matrix."""
    dh, dw = _mats(x)
    bh, bw = dh[: band[0]], dw[: band[1]]
    return bh.T @ (bh @ x @ bw.T) @ bw


def outside_energy(delta: torch.Tensor, band: tuple[int, int]) -> np.ndarray:
    """Per image, the share of ``delta``'s energy (squared L2 norm) outside the band (0 for delta = 0)."""
    d = delta.detach().to(torch.float64)
    out = (d - lowpass(d, band)).flatten(1).pow(2).sum(1)
    total = d.flatten(1).pow(2).sum(1)
    return torch.where(total > 0, out / total.clamp_min(1e-300), torch.zeros_like(total)).cpu().numpy()


def shrink(delta: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """Radial rescale delta x min(1, eps / ||delta||) per sample (L-inf or L2): keeps delta in its
    subspace (PGD's L-inf projection, a per-pixel clip, would not)."""
    flat = delta.flatten(1)
    size = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
    factor = (eps / size.clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


@register_attack
class LowFreq(PGD):
    """PGD restricted to the lowest DCT frequencies (module docstring) on a :class:`DefendedClassifier`.

    Args (beyond :class:`PGD`'s):
        fraction: share of each side's frequencies kept, k = ceil(fraction x side); 1.0 = every
            frequency, the attack is PGD.
    """

    name = "lowfreq"
    config_section = "lowfreq"
    private_section = True
    waterfall_stages = (("low-frequency", None),)
    waterfall_rank = 70

    # -- the registered attack ------------------------------------------------------------------
    @classmethod
    def settings(cls, attacks: dict[str, Any], threat: str) -> list[str]:
        return cls.section_settings(attacks, threat)

    @classmethod
    def calls_per_image(cls, attacks: dict[str, Any], setting: str, S: int, grad_mode: str) -> tuple[Calls, bool]:
        """PGD's count on the section's steps and EOT: the low-pass calls no network."""
        return super().calls_per_image({**attacks, "pgd": pgd_section(attacks, "lowfreq")}, setting, S, grad_mode)

    @classmethod
    def run_batch(cls, model, x, y, ids, *, setting, threat, attacks, seed, track=0):
        """PGD's columns, plus ``lowfreq_outside``: the final perturbation's share of energy outside
        the band (from the [0, 1] clip)."""
        pgd = pgd_section(attacks, "lowfreq")
        attack = cls(model, setting, threat["norm"], threat["eps"], threat["alpha"], steps=pgd["steps"],
                     eot=pgd["eot"], random_start=pgd["random_start"], restarts=pgd["restarts"],
                     eot_chunk=pgd.get("eot_chunk", 4096), track=track,
                     fraction=attacks["lowfreq"].get("fraction", FRACTION))
        res = attack(x, y, ids)
        cols = result_columns(model, x, y, ids, res, setting, attacks["eval_draws"])
        cols["lowfreq_outside"] = res.extra["outside"]
        return cols, res

    # -- the attack -----------------------------------------------------------------------------
    def __init__(self, model, setting: Setting, norm: Norm = "linf", eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 20, eot: int = 10, random_start: bool = False, restarts: int = 1,
                 eot_chunk: int = 4096, track: int = 0, *, fraction: float = FRACTION):
        super().__init__(model, setting, norm, eps, alpha, steps=steps, eot=eot, random_start=random_start,
                         restarts=restarts, eot_chunk=eot_chunk, track=track)
        band_sides(1, 1, fraction)  # a ValueError unless 0 < fraction <= 1
        self.fraction = float(fraction)
        self.band: tuple[int, int] | None = None  # (k_H, k_W) of the batch attacked; None: the full band

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """PGD's direction of the gradient's band component."""
        if self.band is None:
            return super()._direction(grad)
        return ascent_direction(lowpass(grad, self.band), self.norm)

    def _project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Low-pass, radial rescale into the eps-ball (stays in the band), then the [0, 1] clip."""
        if self.band is None:
            return super()._project(x, delta)
        delta = shrink(lowpass(delta, self.band), self.norm, self.eps)
        return (x + delta).clamp(0, 1) - x

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackResult:
        h, w = x.shape[-2:]
        band = band_sides(h, w, self.fraction)
        self.band = None if band == (h, w) else band  # the full band: PGD's own hooks, bit for bit
        res = super().__call__(x, y, ids)
        res.extra["band"] = band
        res.extra["outside"] = outside_energy(res.x_adv - x.detach(), band)
        return res
