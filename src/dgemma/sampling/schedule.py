"""Temperature schedule: linear from t_max at the first denoising step to t_min at the last."""

from __future__ import annotations

import torch


def linear_temperature(steps_left: int, total_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """t = t_min + (t_max - t_min) * n / N, where n counts the steps *remaining* (N..1).

    Computed as a float32 0-d tensor in the reference's order of operations, so scaled logits match bit for bit.
    """
    fraction = torch.tensor(steps_left, dtype=torch.int32) / total_steps
    return t_min + (t_max - t_min) * fraction
