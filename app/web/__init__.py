"""The web dashboard served by the API itself under /ui: jobs live, reports with image grids, compare,
generate, artifacts and models; behind the same API keys (a login form keeps the key in a session)."""

from app.web.routes import router

__all__ = ["router"]
