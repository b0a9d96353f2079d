"""Adversarial Denoising Diffusion Training (ADDT, paper 1 Sec. 5) = CGPO + RBGM.

Paper 1 fine-tunes the diffusion model so that it removes adversarial perturbations itself
instead of relying on randomness.  Each training step:

1. **CGPO** (classifier-guided perturbation optimisation): starting from a Gaussian delta, K
   iterations (default 5) each draw fresh noise eps, form the noisy input with the mixed noise
   ``x_t = sqrt(abar) x0 + sqrt(1 - abar) (sqrt(1 - lambda^2) eps + lambda delta)``, take the
   one-step clean estimate ``x0_hat = (x_t - sqrt(1 - abar) eps_theta(x_t, t)) / sqrt(abar)``,
   add the gradient of the frozen classifier's cross-entropy at x0_hat w.r.t. delta to an
   accumulator G (never reset), and set ``delta = RBGM(G)``.
2. **RBGM** (rank-based Gaussian mapping): per image and channel, a fresh Gaussian sample
   re-ordered by the ranks of G, so delta is exactly Gaussian-distributed with an adversarial
   ordering (every pixel of the mixed noise keeps unit variance).
3. **Training**: ``loss = || eps_theta(x_t, t) - eps_mixed ||^2`` with a fresh eps and the CGPO
   delta, ``lambda_t = clip(0.03 sqrt(abar_t) / sqrt(1 - abar_t), 0, 0.3)``.

Variants (the ablations of paper 1, selected by ``variant``):
``addt``            CGPO + RBGM (the full method);
``addt_no_rbgm``    the L-inf PGD perturbation instead of RBGM (delta from 0, sign steps of
                    ``pgd_alpha`` within ``pgd_eps`` in pixel units; target ``eps + r_t delta``
                    with ``r_t = clip(sqrt(abar) / sqrt(1 - abar), 0, 10)``);
``cgpo_mse``        CGPO's objective replaced by the plain denoising error (no classifier);
``clean_finetune``  the standard DDPM loss with the same schedule (the control).
``adbm``            not an ADDT ablation but its closest competitor, ADBM's bridge loss (Li et al. 2025,
                    :mod:`dbprepro.addt.adbm`): an image-space L-inf perturbation from three FGSM steps,
                    carried with a weight that fades from 1 at the bridge end T' <= 200 to 0 at t = 0.

Everything the papers leave open is a config key (``addt.*`` in the schema).

- ``cgpo.py``: CGPO, RBGM, the no-RBGM PGD perturbation and the RBGM samples of Fig. 5;
- ``adbm.py``: ADBM's bridge coefficients, its training perturbation and loss;
- ``losses.py``: the training loss of every variant and purifier family, :func:`make_loss_fn`;
  fine-tuning itself is :func:`dbprepro.models.training.train_ddpm` with that loss.
"""

from ..purifiers.registry import PURIFIERS
from .adbm import ADBM_DEFAULTS, adbm_loss, adbm_perturbation, bridge_coefficients, bridge_pair, sample_bridge
from .cgpo import cgpo, cgpo_delta, mixing_weight, pgd_perturbation, rbgm, rbgm_samples
from .losses import (FAMILY_VARIANTS, VARIANTS, Variant, _family_noise_levels, addt_loss, addt_loss_family,
                     family_noise_cap, make_loss_fn, network_passes_per_step)


def __getattr__(name: str):
    if name == "LOSS_FAMILIES":  # 0.1's table, now each registered family's loss_family
        return {s: cls.loss_family for s, cls in PURIFIERS.items()}
    raise AttributeError(name)


__all__ = ["ADBM_DEFAULTS", "FAMILY_VARIANTS", "adbm_loss", "adbm_perturbation", "bridge_coefficients", "bridge_pair",
           "sample_bridge", "VARIANTS", "Variant", "addt_loss", "addt_loss_family", "cgpo", "cgpo_delta",
           "family_noise_cap", "make_loss_fn", "mixing_weight", "network_passes_per_step", "pgd_perturbation", "rbgm",
           "rbgm_samples"]
