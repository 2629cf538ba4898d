"""Console sign-in: sessions held in memory, their CSRF tokens, and a guard on guessing.

An operator signs in with the admin token through a form; the answer is a random
session id in an HttpOnly, SameSite=Strict cookie (Secure over TLS).  The token itself
never travels again, and never in a URL.  Every state-changing request must come from
the console's own origin and carry the session's CSRF token.  Sans-IO: every entry
point takes `now`.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass

COOKIE = "bootherd_console"
COOKIE_PATH = "/ui/"
MAX_SESSIONS = 1000           # oldest dropped first
FAILED_SIGN_INS = 5           # per client address per SIGN_IN_WINDOW, then 429
SIGN_IN_WINDOW = 60.0


class SessionRefused(Exception):
    """Why a request's session does not hold: `kind` is missing, unknown or expired."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class Session:
    sid: str
    csrf: str
    created: float
    expires: float
    address: str


class Sessions:
    def __init__(self, lifetime: float, max_sessions: int = MAX_SESSIONS):
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._live: OrderedDict[str, Session] = OrderedDict()
        # Ended sessions are remembered for a while, so a console can say "expired"
        # (sign in again) rather than "not valid" (forged, or from a restarted server).
        self._ended: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, sid: object) -> bool:
        return sid in self._live

    def create(self, now: float, address: str = "") -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now,
                    now + self.lifetime, address)
        self._live[s.sid] = s
        while len(self._live) > self.max_sessions:
            old, _ = self._live.popitem(last=False)
            self._remember(old, now)
        return s

    def check(self, sid: str | None, now: float) -> Session:
        if not sid:
            raise SessionRefused("missing", "not signed in")
        s = self._live.get(sid)
        if s is None:
            if sid in self._ended:
                raise SessionRefused("expired", "your session has ended; sign in again")
            raise SessionRefused("unknown", "this session is not valid (forged, or from "
                                            "before the server restarted); sign in again")
        if now >= s.expires:
            del self._live[sid]
            self._remember(sid, now)
            raise SessionRefused("expired", "your session has expired; sign in again")
        return s

    def end(self, sid: str, now: float) -> None:
        if self._live.pop(sid, None) is not None:
            self._remember(sid, now)

    def end_all(self, now: float) -> int:
        """End every session (the admin token changed); returns how many there were."""
        sids = list(self._live)
        for sid in sids:
            self.end(sid, now)
        return len(sids)

    def _remember(self, sid: str, now: float) -> None:
        self._ended[sid] = now
        while len(self._ended) > self.max_sessions or (
                self._ended and now - next(iter(self._ended.values())) > self.lifetime):
            self._ended.popitem(last=False)


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                               session.csrf.encode())


def token_ok(expected: str, given: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                  expected.encode())


class SignInGuard:
    """At most FAILED_SIGN_INS wrong tokens per client address per window."""

    def __init__(self, limit: int = FAILED_SIGN_INS, window: float = SIGN_IN_WINDOW):
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float) -> float:
        """Seconds this address must wait before trying again (0: it may try)."""
        q = self._failures.get(address)
        if not q:
            return 0.0
        while q and now - q[0] >= self.window:
            q.popleft()
        if not q:
            del self._failures[address]
            return 0.0
        return self.window - (now - q[0]) if len(q) >= self.limit else 0.0

    def failed(self, address: str, now: float) -> None:
        if len(self._failures) > 10000:  # keep the table small under a spray
            self._failures = {a: q for a, q in self._failures.items()
                              if q and now - q[-1] < self.window}
        self._failures.setdefault(address, deque()).append(now)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def same_origin(headers: dict[str, str] | object, host: str, scheme: str) -> str | None:
    """None when a state-changing request comes from this site, else why not.

    Browsers send Origin with every cross-origin POST (and Sec-Fetch-Site with every
    request); either naming another site refuses the request, whatever its cookie."""
    get = headers.get  # type: ignore[attr-defined]
    origin = get("Origin")
    if origin is not None:
        if origin != f"{scheme}://{host}":
            return f"request from another site ({origin}) refused"
        return None
    site = get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"{site} request refused"
    referer = get("Referer")
    if referer is not None and not (referer == f"{scheme}://{host}"
                                    or referer.startswith(f"{scheme}://{host}/")):
        return "request from another site refused (Referer)"
    return None
