"""The canvas sampler as small policies: noise, temperature schedule, acceptance, early stopping."""

from .acceptance import accept_by_entropy, token_entropy
from .noise import CanvasRNG
from .schedule import linear_temperature
from .stopping import StableAndConfident

__all__ = ["CanvasRNG", "StableAndConfident", "accept_by_entropy", "linear_temperature", "token_entropy"]
