"""Brute-force and credential-stuffing defence for the login pages (ASVS v5 V6.3.1,
OWASP Authentication cheat sheet), persisted in the store so it survives restarts and
is shared by every process on it.

Two counters per attempt:

- **per account** (keyed by a keyed hash of the typed username, so unknown usernames are
  throttled exactly like real ones and the table holds no typed text): the first
  `free_failures_per_account` failures are free; then each attempt must wait
  2^(n - free) seconds (capped at `max_delay_seconds`) after the last failure. After
  `lock_after_failures` the account is locked for `lock_seconds`; the lock lifts by itself
  and its counter starts again from zero, so an attacker cannot keep a victim locked out
  for longer than the attempts they keep making buy them — and a passkey login, which no
  guessing can pass, is never blocked by the password lock (the legitimate user always
  has that way in). Second-factor failures count on the same counter; only a completed
  login resets it.
- **per source IP** (IPv6 grouped by /64): `free_failures_per_ip` failures per
  `ip_window_seconds`, then the same doubling delays. No lock: one shared NAT address must
  not lock out its users, only slow the attacker behind it.

While throttled, the password is not checked at all: the answer is "try again in N s".
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from portcullis.oauth.config import LoginThrottleConfig
from portcullis.oauth.db import AuthDb
from portcullis.oauth.identity import tables
from portcullis.oauth.identity.keys import keyed_hash


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: int = 0
    reason: str = "ok"  # "ok" | "login.throttled" | "login.locked"


ALLOW = Verdict(True)


def ip_key(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "ip:" + ip[:60]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is None:
        return "ip:" + str(ipaddress.IPv6Network((addr, 64), strict=False))
    return "ip:" + str(addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else addr)


class LoginThrottle:
    """Failure counters and the verdict for the next attempt."""

    def __init__(self, db: AuthDb, cfg: LoginThrottleConfig, key: bytes, clock: Callable[[], float]) -> None:
        self._db = db
        self._cfg = cfg
        self._key = key
        self._clock = clock

    def account_key(self, username: str) -> str:
        return "acct:" + keyed_hash(self._key, "acct\x00" + username.strip().lower())[:40]

    @staticmethod
    def ip_key(ip: str) -> str:
        return ip_key(ip)

    def _delay(self, failures: int, free: int) -> float:
        if failures < free:
            return 0.0
        return float(min(self._cfg.max_delay_seconds, 2.0 ** (failures - free)))

    def _rows(self, keys: list[str]) -> dict[str, sa.RowMapping]:
        with self._db.engine.connect() as conn:
            rows = conn.execute(sa.select(tables.throttle).where(tables.throttle.c.key.in_(keys))).all()
        return {r._mapping["key"]: r._mapping for r in rows}

    def check(self, account: str | None, ip: str | None) -> Verdict:
        """May an attempt on `account` from `ip` be checked now? (Keys from account_key /
        ip_key; either may be None.)"""
        now = self._clock()
        keys = [k for k in (account, ip) if k]
        rows = self._rows(keys)
        worst = ALLOW
        if account and account in rows:
            r = rows[account]
            if r["locked_until"] is not None and now < r["locked_until"]:
                return Verdict(False, max(1, math.ceil(r["locked_until"] - now)), "login.locked")
            if not self._account_expired(r, now):
                wait = r["last_failure"] + self._delay(r["failures"], self._cfg.free_failures_per_account) - now
                if wait > 0:
                    worst = Verdict(False, max(1, math.ceil(wait)), "login.throttled")
        if ip and ip in rows:
            r = rows[ip]
            if now - r["window_start"] < self._cfg.ip_window_seconds:
                wait = r["last_failure"] + self._delay(r["failures"], self._cfg.free_failures_per_ip) - now
                if wait > 0 and wait > worst.retry_after:
                    worst = Verdict(False, max(1, math.ceil(wait)), "login.throttled")
        return worst

    def _account_expired(self, r: sa.RowMapping, now: float) -> bool:
        """A lock that has lifted, or failures long forgotten, start the count again."""
        if r["locked_until"] is not None:
            return bool(now >= r["locked_until"])
        return bool(now - r["last_failure"] >= self._cfg.lock_seconds)

    def failure(self, account: str | None, ip: str | None) -> None:
        """Record one failed attempt.

        Read-modify-write made atomic on every database: the row is first created if
        missing (`INSERT ... ON CONFLICT DO NOTHING`, so concurrent first failures do not
        collide), then read locked (PostgreSQL `FOR UPDATE`; on SQLite the insert already
        holds the write lock), so concurrent failures from several processes each count.
        """
        now = self._clock()
        with self._db.begin() as conn:
            for key in (account, ip):
                if not key:
                    continue
                # A fresh row: no failures yet (the rules below then count this one as the first).
                insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
                conn.execute(insert(tables.throttle).values(
                    key=key, failures=0, window_start=now, last_failure=now, locked_until=None
                ).on_conflict_do_nothing(index_elements=["key"]))
                row = conn.execute(sa.select(tables.throttle).where(tables.throttle.c.key == key)
                                   .with_for_update()).first()
                m = row._mapping if row else None
                if key == account:
                    fails = 1 if m is None or self._account_expired(m, now) else m["failures"] + 1
                    start = now if m is None or fails == 1 else m["window_start"]
                    locked = now + self._cfg.lock_seconds if fails >= self._cfg.lock_after_failures else None
                else:
                    fresh = m is None or now - m["window_start"] >= self._cfg.ip_window_seconds
                    fails = 1 if fresh or m is None else m["failures"] + 1
                    start = now if fresh or m is None else m["window_start"]
                    locked = None
                values = {"failures": fails, "window_start": start, "last_failure": now, "locked_until": locked}
                if m is None:
                    conn.execute(tables.throttle.insert().values(key=key, **values))
                else:
                    conn.execute(tables.throttle.update().where(tables.throttle.c.key == key).values(**values))

    def success(self, account: str) -> None:
        """A completed login: the account's counter starts again (the IP's does not)."""
        with self._db.begin() as conn:
            conn.execute(tables.throttle.delete().where(tables.throttle.c.key == account))

    def clear(self, key: str) -> bool:
        """Forget a counter (an operator unlocking an account or an address)."""
        with self._db.begin() as conn:
            return bool(conn.execute(tables.throttle.delete().where(tables.throttle.c.key == key)).rowcount)

    def unlock(self, username: str) -> bool:
        """Lift the lock and delays of an account now (CLI)."""
        return self.clear(self.account_key(username))

    def failures(self, key: str) -> int:
        rows = self._rows([key])
        return int(rows[key]["failures"]) if key in rows else 0
