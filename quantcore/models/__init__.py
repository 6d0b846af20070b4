"""Model families. Each family is one module exposing MODELS (name -> ModelEntry) and its model class."""
