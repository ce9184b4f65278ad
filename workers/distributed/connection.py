"""Redis clients for the broker's Redis: one construction (TLS, timeouts) and one reachability check.

Celery reaches Redis through kombu with `workers.distributed.app.celery_config`; everything
else that talks to that Redis (locks, attempt counters, the report log, beat's lease, the
`--broker` client's liveness checks) gets its client from `redis_client`, so both use the
same TLS settings.
"""

from __future__ import annotations

import ssl
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from ..config import Settings, mask_url

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}


def redis_client(url: str, settings: Settings, timeout: float | None = None) -> redis.Redis:
    """A redis-py client for a broker URL, with the same TLS settings Celery uses.

    redis-py reads `ssl_*` query parameters itself but knows only `required`/`optional`/
    `none` for `ssl_cert_reqs`; Celery's documented spelling is `CERT_REQUIRED`. Both work
    here: the parameters are taken out of the URL and passed as keyword arguments. TCP
    connects time out after `connect_timeout`; `timeout` also bounds every command.
    """
    options: dict[str, Any] = settings.redis_tls(url) or {}
    options["socket_connect_timeout"] = settings.connect_seconds
    if timeout is not None:
        # redis-py sets this right after the TCP connect, before the TLS handshake: without
        # it a handshake with a plaintext server waits forever.
        options["socket_timeout"] = timeout
    parts = urlsplit(url)
    query = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "ssl_cert_reqs":
            name = value.lower().removeprefix("cert_")
            if name not in _CERT_REQS:
                raise ValueError(f"invalid ssl_cert_reqs {value!r} in the Redis URL")
            options[key] = _CERT_REQS[name]
        elif key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            options[key] = value
        else:
            query.append((key, value))
    plain = urlunsplit(parts._replace(query=urlencode(query)))
    return redis.Redis.from_url(plain, **options)


class Unreachable(Exception):
    """Redis did not answer within the connect timeout; the message is the one line to show.

    `transient`: the connection was refused or reset (Redis down or starting), as opposed
    to an answer that will not change by waiting (no handshake, wrong password, bad cert).
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def _why(exc: BaseException) -> str:
    """A short reason for a failed connection, from redis-py's exception chain."""
    causes = [exc, exc.__cause__, exc.__context__]
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return "connection refused"
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.ResponseError):
        return f"refused by the server: {exc}"
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "no answer (a TLS URL, rediss://, to a plaintext server? a firewall?)"
    return text


def check_reachable(url: str, settings: Settings, what: str = "broker", retry: bool = True) -> None:
    """PING the Redis at `url` within `connect_timeout`; Unreachable (one line) if it fails.

    With `retry`, a refused or reset connection is tried again for the rest of that time
    (a Redis that is just starting); a wrong password or a bad certificate never is.
    """
    budget = settings.connect_seconds
    deadline = time.monotonic() + budget
    while True:
        left = max(0.1, deadline - time.monotonic())
        client = redis_client(url, settings, timeout=left)
        try:
            client.ping()
            return
        except (redis.RedisError, OSError) as exc:
            reason = _why(exc)
            transient = reason == "connection refused" or "reset" in reason.lower()
            if not (retry and transient) or time.monotonic() + 0.5 >= deadline:
                raise Unreachable(
                    f"cannot reach the {what} at {mask_url(url)} within {budget:g} s: {reason}",
                    transient,
                ) from None
        finally:
            client.close()
        time.sleep(0.5)


__all__ = ["Unreachable", "check_reachable", "redis_client"]
