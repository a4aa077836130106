"""Celery only: the app object, queues, and thin tasks that take a job id."""
