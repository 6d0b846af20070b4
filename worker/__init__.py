"""Celery workers of ptq4arvg. Importing this package never imports torch or quantcore."""
