"""Evaluation: proxy image-quality metrics (bundled models) and fidelity to the FP model."""
