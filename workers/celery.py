"""Where `celery -A workers worker|beat|flower` finds the app: `workers.distributed.app`."""

from .distributed.app import app

__all__ = ["app"]
