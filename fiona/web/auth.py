"""Users, passwords, API tokens, login throttling and CSRF tokens for the web interface.

Passwords are hashed with Argon2id (``argon2-cffi``); API tokens are random and stored as their
SHA-256 (shown once, by ``fiona user token``). Failed logins are counted per user name and per
client address in a sliding window; past ``web.login_attempts`` further attempts are refused
without checking the password. Every login, failure and user change is an audit row.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from fiona.audit import audit_event
from fiona.db import AuditEventType, User, UserRole

__all__ = [
    "LoginThrottle",
    "UserError",
    "WebUser",
    "add_user",
    "check_password",
    "csrf_matches",
    "disable_user",
    "hash_password",
    "issue_token",
    "new_csrf_token",
    "user_for_token",
]

_HASHER = PasswordHasher()
# Verifying against this when the name is unknown takes as long as for a real user.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_PASSWORD = 12


class UserError(ValueError):
    """A user cannot be added or changed (the message says why)."""


@dataclass(frozen=True)
class WebUser:
    """Who is logged in: what the pages and the API check permissions against."""

    name: str
    role: UserRole
    projects: tuple[str, ...]

    def may_see_project(self, project: str | None) -> bool:
        if self.role in (UserRole.ADMIN, UserRole.AUDITOR):
            return True
        return project is not None and project in self.projects

    @property
    def may_change(self) -> bool:
        """Auditors only read."""
        return self.role in (UserRole.ADMIN, UserRole.PROJECT)


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    return _HASHER.hash(password)


def check_password(session: Session, name: str, password: str) -> WebUser | None:
    """The user if *name* exists, is enabled and *password* is theirs; else None."""
    user = session.scalars(select(User).where(User.name == name)).first()
    stored = user.password_hash if user is not None else _DUMMY_HASH
    try:
        _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    return WebUser(user.name, user.role, tuple(user.projects or ()))


def add_user(
    session: Session,
    name: str,
    role: UserRole,
    projects: Sequence[str],
    password: str,
    actor: str,
    now: datetime,
    known_projects: Sequence[str],
) -> User:
    """Add a user, or change an existing one's role, projects and password (audited)."""
    if not _NAME.fullmatch(name):
        raise UserError(f"user name {name!r}: letters, digits, _ . @ - (up to 64)")
    unknown = sorted(set(projects) - set(known_projects))
    if unknown:
        raise UserError(f"unknown projects {', '.join(unknown)}")
    if role == UserRole.PROJECT and not projects:
        raise UserError("a project user needs at least one --project")
    if role != UserRole.PROJECT and projects:
        raise UserError("--project goes with --role project only")
    digest = hash_password(password)
    user = session.scalars(select(User).where(User.name == name)).first()
    action = "changed" if user is not None else "added"
    if user is None:
        user = User(name=name, created_at=now, disabled=False)
        session.add(user)
    user.role, user.projects, user.password_hash = role, sorted(projects), digest
    user.disabled = False
    _changed(session, user, actor, now, action, role=role.value, projects=sorted(projects))
    return user


def _named(session: Session, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        raise UserError(f"no user {name!r}")
    return user


def _changed(
    session: Session, user: User, actor: str, now: datetime, action: str, **details: Any
) -> None:
    """Stamp *user* changed now and audit it (never with a password or token)."""
    user.updated_at = now
    session.add(
        audit_event(
            AuditEventType.USER_CHANGED,
            actor=actor,
            occurred_at=now,
            user=user.name,
            action=action,
            **details,
        )
    )


def disable_user(session: Session, name: str, actor: str, now: datetime) -> None:
    """Lock *name* out: web sessions end at their next request, the API token stops working."""
    if name == actor:
        raise UserError("you cannot disable yourself")
    user = _named(session, name)
    user.disabled = True
    _changed(session, user, actor, now, "disabled")


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def issue_token(session: Session, name: str, actor: str, now: datetime) -> str:
    """A new API token for *name* (replaces the old one); returned once, stored hashed."""
    user = _named(session, name)
    token = "fiona_" + secrets.token_urlsafe(32)
    user.token_hash = _token_digest(token)
    _changed(session, user, actor, now, "token issued")
    return token


def user_for_token(session: Session, token: str) -> WebUser | None:
    """The enabled user whose API token this is, or None."""
    if not token.startswith("fiona_"):
        return None
    user = session.scalars(select(User).where(User.token_hash == _token_digest(token))).first()
    if user is None or user.disabled:
        return None
    return WebUser(user.name, user.role, tuple(user.projects or ()))


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginThrottle:
    """Failed logins per key (a user name, an address) within a sliding window."""

    def __init__(self, attempts: int, window_seconds: float) -> None:
        self.attempts = attempts
        self.window = window_seconds
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(key, now)) >= self.attempts for key in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)
