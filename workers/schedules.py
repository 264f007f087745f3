"""Learning-rate schedules as a function of the (fractional) epoch; plain Python, set before every step.

One function for every policy, as PySlowFast's ``slowfast/utils/lr_policy.py`` does it
(``get_lr_at_epoch(cfg, cur_epoch)`` called with ``cur_epoch + cur_iter / iters_per_epoch`` before each
iteration, ``tools/train_net.py``), so a schedule, its warm-up and a resumed run agree on every step:

* ``step``: ``base * ratio ** floor(epoch / step)``, what ``torch.optim.lr_scheduler.StepLR`` stepped once
  per epoch gives (OGM-GE ``main.py``: ``StepLR(optimizer, 70, 0.1)``);
* ``constant``: ``base`` (MMPareto's ``code/MMPareto.py`` builds a StepLR it never steps);
* ``cosine``: ``end + (base - end) * (cos(pi * epoch / epochs) + 1) / 2`` (PySlowFast ``lr_func_cosine``;
  ``end`` = ``SOLVER.COSINE_END_LR``, 0 in the releases without it);
* warm-up (any policy): for ``epoch < warmup_epochs``, linear from ``warmup_start_lr`` to the policy's rate
  at ``warmup_epochs`` (PySlowFast ``get_lr_at_epoch``: ``alpha = (lr_end - lr_start) / WARMUP_EPOCHS``,
  ``lr = cur_epoch * alpha + lr_start``).
"""
from __future__ import annotations

import math

__all__ = ["learning_rate_at"]


def _policy_rate(train, epoch: float) -> float:
    base = train.learning_rate
    if train.lr_schedule == "constant":
        return base
    if train.lr_schedule == "step":
        return base * train.lr_decay_ratio ** math.floor(epoch / train.lr_decay_step)
    if train.lr_schedule == "cosine":
        end = train.cosine_end_lr
        return end + (base - end) * (math.cos(math.pi * epoch / train.epochs) + 1.0) * 0.5
    raise ValueError(f"train.lr_schedule: unknown schedule {train.lr_schedule!r}")


def learning_rate_at(train, epoch: float) -> float:
    """The rate of ``train`` (a ``workers.specs.TrainSpec``) at fractional ``epoch`` (0 = first step)."""
    if epoch < train.warmup_epochs:
        start, end = train.warmup_start_lr, _policy_rate(train, train.warmup_epochs)
        return start + (end - start) * epoch / train.warmup_epochs
    return _policy_rate(train, epoch)
