"""Images and video for the vision tower: decoding, Gemma 4's image processor, video frame sampling."""

from .image import DEFAULT_BUDGET, SOFT_TOKEN_BUDGETS, ImageProcessor, MediaError, ProcessedImages, open_image

__all__ = ["DEFAULT_BUDGET", "SOFT_TOKEN_BUDGETS", "ImageProcessor", "MediaError", "ProcessedImages", "open_image"]
