"""The ptq4arvg job service: FastAPI app, persistence and auth.

Importing this package is cheap and never imports torch or quantcore; the worker imports
``app.config`` and ``app.db`` (the job state machine is ``app.db.jobs``) from here.
"""
