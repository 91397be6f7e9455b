"""Talking to the Hugging Face Hub: bounded requests, retries and one-line failures.

Every request is bounded: a Hub that accepts the connection but never answers is given up on after
PIZOO_HUB_TIMEOUT seconds without progress (default 60), the call is retried PIZOO_HUB_RETRIES times
in all (default 3, with a short backoff), and then pizoo stops with one line (hub_failure, the token
scrubbed out). The endpoint comes from HF_ENDPOINT, read at call time.

A leaf beside pizoo.hub (push, pull): pizoo.data fetches Hub datasets through it without importing
the publishing side (which imports the card, which imports pizoo.data).
"""

from __future__ import annotations

import os
import time

from .errors import PizooError

LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN"
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# Environment


TIMEOUT_ENV = "PIZOO_HUB_TIMEOUT"
RETRIES_ENV = "PIZOO_HUB_RETRIES"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_ATTEMPTS = 3


def _env_number(name: str, default: float, minimum: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise PizooError(f"{name}={text}: not a number") from None
    if value < minimum:
        raise PizooError(f"{name}={text}: must be at least {minimum:g}")
    return value


def hub_timeout() -> float:
    """Seconds any Hub request may wait without progress (connect, each read, each write)."""
    return _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, 0.1)


def hub_attempts() -> int:
    """How many times a Hub call that got no answer (timeout, connection error) is tried in all."""
    return int(_env_number(RETRIES_ENV, DEFAULT_ATTEMPTS, 1))


_bounded_for: float | None = None
_library_timeouts: dict[str, float | None] = {}


def bound_hub_requests() -> None:
    """Give every huggingface_hub request a bounded wait (hub_timeout()).

    The client's shared HTTP session has no timeout of its own, and most API calls pass none, so a
    Hub that accepts the connection and never answers would block forever. The session's transport is
    wrapped so that each request's unset timeouts get ours; the download timeouts the library reads
    from its constants (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT) are capped by it too."""
    global _bounded_for
    from huggingface_hub import constants

    limit = hub_timeout()
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        if hasattr(constants, name):
            # Capped from the library's own value, so a later call with a longer limit (another
            # PIZOO_HUB_TIMEOUT in the same process) is not held to an earlier, shorter one.
            own = _library_timeouts.setdefault(name, getattr(constants, name))
            setattr(constants, name, min(own or limit, limit))
    if _bounded_for == limit:
        return
    try:
        from huggingface_hub.utils import _http as hf_http
    except ImportError:  # pragma: no cover - an old requests-based client: the constants above apply
        return
    httpx = getattr(hf_http, "httpx2", None) or getattr(hf_http, "httpx", None)
    if httpx is None or not hasattr(hf_http, "set_client_factory"):  # pragma: no cover - old client
        return

    class BoundedTransport(httpx.BaseTransport):
        def __init__(self, inner):
            self.inner = inner

        def handle_request(self, request):
            given = dict(request.extensions.get("timeout") or {})
            request.extensions = {**request.extensions,
                                  "timeout": {k: limit if given.get(k) is None else given[k]
                                              for k in ("connect", "read", "write", "pool")}}
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    def factory():
        client = hf_http.default_client_factory()
        client._transport = BoundedTransport(client._transport)
        client._mounts = {k: BoundedTransport(v) if v is not None else v for k, v in client._mounts.items()}
        return client

    hf_http.set_client_factory(factory)
    _bounded_for = limit


def with_retries(call, *, action: str, repo_id: str, endpoint: str, token: str | None):
    """Run `call()` (Hub requests), retrying what got no answer; any failure ends as one PizooError
    line (hub_failure)."""
    attempts = hub_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if attempt < attempts and _is_network_error(e):
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
                continue
            raise hub_failure(e, action=action, repo_id=repo_id, endpoint=endpoint, token=token,
                              attempts=attempt) from None


def hub_endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or constants.is_offline_mode()


# --------------------------------------------------------------------------------------------
# Errors


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _network_errors() -> tuple[type, ...]:
    types: list[type] = [ConnectionError, TimeoutError]
    for mod_name in ("httpx2", "httpx"):
        try:
            mod = __import__(mod_name)
        except ImportError:
            continue
        types += [mod.NetworkError, mod.TimeoutException, mod.RemoteProtocolError]
    return tuple(types)


def _is_network_error(exc: BaseException) -> bool:
    return any(isinstance(e, _network_errors()) for e in _chain(exc))


def _is_timeout(exc: BaseException) -> bool:
    return any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in _chain(exc))


def hub_failure(exc: BaseException, *, action: str, repo_id: str, endpoint: str, token: str | None,
                attempts: int = 1) -> PizooError:
    """One line for what went wrong talking to the Hub, with the fix; the token is scrubbed out."""
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    chain = list(_chain(exc))
    message = None
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        message = f"HF_HUB_OFFLINE is set: cannot {action} {repo_id}; unset HF_HUB_OFFLINE to use the Hub"
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    if message is None and http is not None:
        status = http.response.status_code
        server = (http.server_message or "").strip().splitlines()
        detail = f": {server[0]}" if server else ""
        namespace = repo_id.split("/")[0]
        if status == 401 and not isinstance(http, RepositoryNotFoundError):
            message = f"the Hub at {endpoint} rejected the token (401 Unauthorized); {LOGIN_HINT} with a valid token"
        elif status == 403:
            message = (f"the token may not write to '{namespace}' on the Hub (403 Forbidden{detail}); use a token "
                       f"with write access to that user or organization ({LOGIN_HINT})")
        elif isinstance(http, RevisionNotFoundError):
            message = f"{repo_id}: revision not found on the Hub; check --revision"
        elif isinstance(http, RepositoryNotFoundError) or status in (401, 404):
            message = f"{repo_id}: repository not found on the Hub at {endpoint} (or private and the token cannot see it)"
        else:
            message = f"cannot {action} {repo_id}: the Hub at {endpoint} answered {status}{detail}"
    if message is None and _is_network_error(exc):
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        how = (f"no answer within {hub_timeout():g} s, {tries}" if _is_timeout(exc) else f"no connection, {tries}")
        resume = "a retried push uploads only what is missing" if action.startswith("push") else \
            "a retried pull resumes the partial download"
        message = (f"cannot reach the Hub at {endpoint} to {action} {repo_id} ({how}); check the network or "
                   f"HF_ENDPOINT and retry ({resume}; {TIMEOUT_ENV} sets the wait)")
    if message is None and any(isinstance(e, HFValidationError) for e in chain):
        message = f"repo id '{repo_id}': rejected by huggingface_hub ({str(chain[-1]).splitlines()[0]})"
    if message is None:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        message = f"cannot {action} {repo_id}: {type(exc).__name__}: {first}"
    if token:
        message = message.replace(token, "***")
    return PizooError(message)
