"""Cost estimate of a configuration: network calls counted per job, seconds per call measured.

Two separate parts:

* :func:`count_calls` (pure, torch-free, unit-tested against hand counts) walks the jobs the DAG
  of a validated config runs and counts, per job, the network calls per image kind:

  ============== ===============================================================================
  ``unet_fwd``    UNet forward without autograd graph (a purification step, the forward pass of
                  the exact gradient)
  ``unet_grad``   UNet forward with graph + backward to the input, weights frozen (one recomputed
                  step of the exact gradient, a CGPO iteration)
  ``unet_train``  UNet forward + backward with weight gradients (a training step's pass)
  ``clf_fwd``     classifier forward
  ``clf_grad``    classifier forward + backward to the input (weights frozen)
  ``clf_train``   classifier forward + backward with weight gradients
  ============== ===============================================================================

  all in *images* (a batch of 64 is 64 calls).  The purification chain has ``S`` UNet steps
  (the timesteps <= t* of ``set_timesteps(num_inference_steps)``: 101 for t*=0.1 and 1000);
  a defended forward is ``S unet_fwd + 1 clf_fwd``; its exact gradient (``grad_mode`` exact or
  checkpoint) is the forward chain, then per step a recomputation + backward:
  ``S unet_fwd + S unet_grad + 1 clf_grad`` (``autograd``: ``S unet_grad + 1 clf_grad``).

* :func:`measure_unit_costs` times each kind of call on the current device with randomly
  initialised networks of the configured architectures (CIFAR-10: google/ddpm-cifar10-32's
  UNet2DModel and the WRN-28-10; digits: the configured digits UNet and small CNN).

:func:`estimate` multiplies the two into device-hours per job.  AutoAttack rows are upper
bounds (every image goes through every sub-attack; AutoAttack stops attacking an image once it
is broken).  Not counted: data preparation, downloads, tables and figures (seconds), the RBGM
figure (a few CGPO calls) and optimiser/scheduler arithmetic.

- ``count.py``: :func:`count_calls` and its units; ``measure.py``: :func:`measure_unit_costs`;
  ``report.py``: :func:`estimate`, :func:`format_report`, :func:`run_estimate`.
"""

from ..calls import KINDS, Calls, bpda_grad, defended_forward, defended_grad, purify, purify_grad
from ..purifiers.ddpm import chain_length
from .count import Job, addt_step_calls, attack_run_calls, count_calls, image_shape, n_train_images, network_calls
from .measure import default_batch_size, measure_unit_costs
from .report import by_target, estimate, format_report, run_estimate

__all__ = ["KINDS", "Calls", "Job", "addt_step_calls", "attack_run_calls", "bpda_grad", "by_target", "chain_length", "count_calls",
           "default_batch_size", "defended_forward", "defended_grad", "estimate", "format_report", "image_shape",
           "measure_unit_costs", "n_train_images", "network_calls", "purify", "purify_grad", "run_estimate"]
