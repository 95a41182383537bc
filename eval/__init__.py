"""Evaluation harness: official scoring and aspect-ratio robustness (SPEC section 4)."""
