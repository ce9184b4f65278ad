"""The result backend: Celery's Redis backend, with chord bookkeeping that survives a Redis restart."""

from __future__ import annotations

from functools import partial
from typing import Any

from celery.backends.redis import RedisBackend
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


class RedisResults(RedisBackend):
    """Celery's Redis result backend, with chord bookkeeping that outlasts a Redis restart.

    `result_backend_always_retry` retries storing a result but not the chord step that
    follows it. A task finishing just as Redis comes back (its pooled connection stale) had
    its result stored, then failed in that step: Celery recorded the *task* as failed with
    the ConnectionError and the whole chord broke ("Dependency ... raised
    network:ConnectionError"). The step is safe to repeat: Celery's script records each
    member once, and a callback claim left by a lost reply expires after a few seconds.
    Every command also reconnects and is repeated while Redis is away (see __init__).
    """

    def __init__(self, *args: Any, url: str | None = None, **kwargs: Any) -> None:
        # Chosen by class (app.backend_cls), the backend is not handed the URL.
        super().__init__(*args, url=url or kwargs["app"].conf.result_backend, **kwargs)
        # Celery builds its connection pool without a retry policy, so redis-py does not
        # retry at all: the first command on a connection that Redis dropped fails. Some of
        # those failures Celery turns into a broken chord on the spot ("Join error"), past
        # any retry of ours. Reconnect and repeat each command for about 15 s instead (a
        # restart; longer outages meet the retries above this level), backing off from
        # 0.05 s to 1 s. The CLI's polls wait as long before they report the outage.
        self.connparams["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.05), 20)

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kwargs: Any
    ) -> Any:
        """Count a chord member's result; retried while Redis is unreachable."""
        step = partial(super().on_chord_part_return, propagate=propagate, **kwargs)
        # About as long as storing a result is retried (result_backend_max_retries).
        return self.ensure(
            step,
            (request, state, result),
            max_retries=60,
            interval_start=0,
            interval_step=0.5,
            interval_max=5,
        )


__all__ = ["RedisResults"]
