"""Persistence: the ORM models (``app.db.models``) and engine/session helpers (``app.db.session``)."""
