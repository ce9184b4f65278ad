"""The result backend's chord step under a Redis connection lost at the wrong moment.

Narrow by design: the failure is injected in front of Celery's own chord step (the first
calls raise redis's ConnectionError, as a stale pooled connection does right after a Redis
restart); everything behind it — chord counters, the callback message — is real Redis.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from celery.app.task import Context
from celery.backends.redis import RedisBackend

from tests.distributed_harness import RedisInstance
from tests.fixtures_redis import make_test_app
from workers.distributed.backend import RedisResults

pytestmark = [pytest.mark.distributed]

DB = 11  # this module's Redis database


def chord_member(app: Any, group_id: str, index: int, callback: Any) -> Context:
    """The request of header task `index` of a chord whose body is `callback`."""
    return Context(
        id=str(uuid.uuid4()),
        group=group_id,
        group_index=index,
        chord=callback,
        delivery_info={},
    )


def queued_callbacks(client: redis.Redis, queue: str) -> list[str]:
    """Task names of the messages waiting in `queue`."""
    return [json.loads(m)["headers"]["task"] for m in client.lrange(queue, 0, -1)]


def test_a_chord_member_finishing_while_redis_is_away_does_not_break_the_chord(
    redis_server: RedisInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_server.client(DB)
    client.flushdb()
    app = make_test_app(redis_server.url(DB))
    backend = app.backend
    assert isinstance(backend, RedisResults)  # what every worker and the CLI get

    group_id = str(uuid.uuid4())
    # A name no app registers: the callback is only counted, never run (once another test
    # has imported workers.distributed.tasks, a real task's signature is checked against its parameters).
    callback = app.signature("ccarchive.test_chord_callback", queue="results-test")
    callback.freeze()
    backend.set_chord_size(group_id, 2)
    members = [chord_member(app, group_id, i, callback) for i in range(2)]

    real_step = RedisBackend.on_chord_part_return
    failures = {"left": 2}

    def flaky_step(self: Any, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise redis.ConnectionError("Connection closed by server.")
        return real_step(self, request, state, result, **kwargs)

    monkeypatch.setattr(RedisBackend, "on_chord_part_return", flaky_step)
    for i, request in enumerate(members):
        backend.store_result(request.id, {"host": i}, "SUCCESS", request=request)
        backend.on_chord_part_return(request, "SUCCESS", {"host": i})

    assert failures["left"] == 0  # both failures happened and were retried past
    # Both members counted, the callback sent exactly once, and neither member was
    # turned into a failure.
    assert queued_callbacks(client, "results-test") == ["ccarchive.test_chord_callback"]
    assert [backend.get_state(m.id) for m in members] == ["SUCCESS", "SUCCESS"]


def test_a_chord_member_counted_twice_after_a_lost_reply_is_counted_once(
    redis_server: RedisInstance,
) -> None:
    """The retry is safe because Celery's chord script records each member once: repeating
    the step for a member whose first attempt did reach Redis changes nothing."""
    client = redis_server.client(DB)
    client.flushdb()
    app = make_test_app(redis_server.url(DB))
    backend = app.backend
    group_id = str(uuid.uuid4())
    callback = app.signature("ccarchive.test_chord_callback", queue="results-test")
    callback.freeze()
    backend.set_chord_size(group_id, 2)
    first, second = (chord_member(app, group_id, i, callback) for i in range(2))

    backend.on_chord_part_return(first, "SUCCESS", 1)
    backend.on_chord_part_return(first, "SUCCESS", 1)  # the repeat
    assert queued_callbacks(client, "results-test") == []  # still waiting for the second
    backend.on_chord_part_return(second, "SUCCESS", 2)
    assert queued_callbacks(client, "results-test") == ["ccarchive.test_chord_callback"]
