"""quantcore: the PTQ4ARVG engine (models, tokenizers, quantization passes, artifacts, evaluation).

Only torch and numpy; nothing here imports the service. Torch ops never run at import time.
"""

__version__ = "0.1.0"
