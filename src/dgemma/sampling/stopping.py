"""Adaptive early stopping of the denoising loop, per row."""

from __future__ import annotations

import torch


class StableAndConfident:
    """Stop a row when its argmax canvas equals each of the previous `stability_threshold` argmax canvases
    and the mean token entropy of its scaled logits is below `confidence_threshold`."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: torch.Tensor | None = None

    def reset(self) -> None:
        self.history = None

    def __call__(self, argmax_canvas: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
        if self.stability_threshold == 0:
            stable = torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability_threshold, *argmax_canvas.shape), -1,
                                          dtype=argmax_canvas.dtype, device=argmax_canvas.device)
            stable = (self.history == argmax_canvas[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax_canvas
        return stable & (mean_entropy < self.confidence_threshold)
