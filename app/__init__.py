"""The ptq4arvg job service: FastAPI app, persistence and auth.

Importing this package is cheap and never imports torch or quantcore; the worker imports
``app.config``, ``app.db`` and ``app.crud`` from here.
"""
