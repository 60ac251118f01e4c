"""Evaluation: held-out loss, line infilling (standard library, HumanEval) for diffusion and the AR baseline."""
