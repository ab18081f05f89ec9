"""Temperature scaling: one number, fit on held-out stories, that makes a model's confidence honest.

A small model read a dozen times over a small corpus memorises it. On text it has not seen it
is then overconfident: its next-token probabilities are too peaked, and its loss is higher than
it needs to be. Dividing every logit by a temperature T > 1 softens them. T is chosen to
minimise the loss on stories held out of training (never the validation stories, which judge
the result): Guo et al. 2017, "On Calibration of Modern Neural Networks".

Why it is easy. Write b = 1 / T, z for one position's logits and y for its target. The loss
is convex in b:

    loss(b)   = logsumexp(b * z) - b * z[y]
    loss'(b)  = E_p[z] - z[y]                  where p = softmax(b * z)
    loss''(b) = E_p[z^2] - E_p[z]^2 = Var_p[z] >= 0

so Newton's method, b <- b - loss' / loss'', summed over every held-out target, reaches the
minimum in a few steps from b = 1. Worked example: one position with logits z = [2, 0] and
target 1 (the model was confidently wrong). At b = 1, p = [0.881, 0.119], loss' = 1.762,
loss'' = 0.420: b falls, the logits soften, and the loss goes down.

Why it costs nothing afterwards. The logits are final_norm(x) @ W^T, and a LayerNorm's output
is weight * x_hat + bias, so multiplying its weight and bias by b multiplies every logit by b.
The calibrated model has the same shape and parameters; the KV cache, beam search, int8 and the
exports run it unchanged.

The file: temperature_derivatives (the two sums over held-out batches), fit_inverse_temperature
(Newton's method on them), head_norm (the LayerNorm that feeds the head) and fold_temperature.
Given held-out stories (train_tinystories_model.py --calibration_stories), training fits T at
every evaluation, scores the validation text at it, and folds it into the best model it saves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from common import autocast
from evaluation import collate


@torch.no_grad()
def temperature_derivatives(model: nn.Module, dataset: torch.utils.data.Dataset, batches: list[list[int]],
                            device: torch.device, amp_dtype: torch.dtype | None, inverse_temperature: float
                            ) -> list[float]:
    """[sum of loss'(b), sum of loss''(b)] over the targets (not -100) of the given batches of
    dataset items, b = inverse_temperature (see the module docstring). Sums, not means, so
    that the shares of several processes add up."""
    was_training = model.training
    model.eval()
    first = second = 0.0
    for indices in batches:
        batch = collate(dataset, indices)
        inputs, targets = batch.inputs.to(device), batch.targets.to(device).flatten()  # targets: (batch * seq,)
        with autocast(device, amp_dtype):
            logits = model(inputs).logits  # (batch, seq, vocab)
        counted = targets != -100
        z = logits.float().flatten(0, 1)[counted]  # (targets, vocab)
        p = torch.softmax(inverse_temperature * z, dim=-1)
        mean_z = (p * z).sum(-1)  # E_p[z], (targets,)
        first += (mean_z - z.gather(1, targets[counted, None]).squeeze(1)).sum().item()
        # Var_p[z] as E_p[(z - E_p[z])^2], never negative (E_p[z^2] - E_p[z]^2 cancels badly in float32).
        second += (p * (z - mean_z[:, None]) ** 2).sum().item()
    model.train(was_training)
    return [first, second]


def fit_inverse_temperature(derivatives: Callable[[float], list[float]], max_steps: int = 20,
                            tolerance: float = 1e-5) -> float:
    """The b > 0 where the held-out loss is lowest, by Newton's method from b = 1.
    derivatives(b) returns [loss'(b), loss''(b)] (any positive multiple: sums do). A step
    never more than halves b, so b stays positive."""
    inverse_temperature = 1.0
    for _ in range(max_steps):
        first, second = derivatives(inverse_temperature)
        if second <= 0:  # every prediction certain: softer if some are wrong, else nothing to fit
            if first <= 0:
                break
            inverse_temperature /= 2
            continue
        step = first / second
        inverse_temperature = max(inverse_temperature - step, inverse_temperature / 2)
        if abs(step) < tolerance:
            break
    return inverse_temperature


def head_norm(model: nn.Module) -> nn.LayerNorm:
    """The LayerNorm whose output the LM head reads: the final norm of a pre-norm model, the
    last block's second norm of a post-norm one."""
    return model.final_norm if isinstance(model.final_norm, nn.LayerNorm) else model.blocks[-1].norm2


@torch.no_grad()
def fold_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """Divide every logit of model by temperature, in place, by scaling the weight and bias of
    the LayerNorm that feeds the head; returns model."""
    norm = head_norm(model)
    norm.weight.div_(temperature)
    if norm.bias is not None:
        norm.bias.div_(temperature)
    return model
