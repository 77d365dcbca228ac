"""API keys (``x-api-key`` or ``Authorization: Bearer``, compared in constant time) and per-key rate limits."""

from __future__ import annotations

import hmac
import os
import threading
import time
from pathlib import Path

from cairn.errors import CairnError


def load_keys(keys: list[str] | None = None, keys_file: str | Path | None = None, env: bool = True) -> list[str]:
    """Keys from the command line, a file (one per line, ``#`` comments) and ``CAIRN_API_KEYS`` (comma-separated)."""
    out = [k.strip() for k in keys or [] if k.strip()]
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.is_file():
            raise CairnError(f"{path}: no such API keys file (one key per line)")
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    if env:
        out += [k.strip() for k in os.environ.get("CAIRN_API_KEYS", "").split(",") if k.strip()]
    return list(dict.fromkeys(out))


class KeyChecker:
    def __init__(self, keys: list[str] | None):
        self.keys = [k.encode() for k in keys or []]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @staticmethod
    def presented(headers) -> str | None:
        key = headers.get("x-api-key")
        if key:
            return key.strip()
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None

    def check(self, key: str | None) -> bool:
        """True when ``key`` is one of the configured keys; every key is compared, each in constant time."""
        if not self.keys:
            return True
        given = (key or "").encode()
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(given, k)
        return ok and key is not None


class RateLimiter:
    """A token bucket per client (API key, or address without keys): ``per_minute`` requests, bursts up to it."""

    def __init__(self, per_minute: float | None):
        self.rate = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """0 when the request may go ahead, else the seconds to wait before retrying."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        per_s = self.rate / 60.0
        with self.lock:
            tokens, last = self.buckets.get(client, (float(self.rate), now))
            tokens = min(float(self.rate), tokens + (now - last) * per_s)
            if tokens >= 1:
                self.buckets[client] = (tokens - 1, now)
                return 0.0
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / per_s
