"""The node secret and keyed hashes, so that identifiers never appear in clear in logs.

The secret lives in ``<storage>/node.key`` (created with mode 0600 on first use). A study
key is ``HMAC-SHA256(secret, StudyInstanceUID)``: an auditor holding a UID can look it up,
nobody can enumerate UIDs from the log.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["keyed_hash", "load_node_key", "load_or_create_key", "project_key_path"]

NODE_KEY_FILE = "node.key"


def load_node_key(storage: Path) -> bytes:
    """Return the node secret, creating it atomically if it does not exist."""
    return load_or_create_key(storage / NODE_KEY_FILE)


def project_key_path(storage: Path, project: str) -> Path:
    """Where a project's storage-managed secret lives (when ``secret_file`` is not set)."""
    return storage / "secrets" / f"{project}.key"


def load_or_create_key(path: Path) -> bytes:
    """Return the 32-byte secret in *path* (hex text), creating it atomically (mode 0600)."""
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        # link() fails if another process created the key first: use theirs.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def keyed_hash(key: bytes, value: str) -> str:
    """Return a 32-hex-digit keyed hash of an identifier."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
