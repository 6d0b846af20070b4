"""HTTP routers: thin; they validate, authorize and call app.crud, app.db.jobs and app.services."""
