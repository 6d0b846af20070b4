"""A module bound by name at import time and imported on first attribute access.

Pass files hold their configuration (pydantic, which recipes and so the API process import) beside the
torch code that runs them; binding `torch` through `deferred` keeps importing a recipe torch-free.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class deferred:  # noqa: N801 - reads like the module it stands for
    def __init__(self, name: str):
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)  # cached in sys.modules after the first call

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"
