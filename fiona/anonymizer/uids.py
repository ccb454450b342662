"""UID schemes: how a project maps original UIDs (and short identifiers) to new ones.

Three schemes, chosen per project:

``mmiv``
    Bit-compatible with the MMIV C++ DICOMAnonymizer's ``hashuid+PROJECTNAME`` so that new data
    merges with what the research PACS already holds::

        digits(b) = sha256(b).hexdigest() with a→0 b→1 c→2 d→3 e→4 f→5
        new_uid   = ("1.3.6.1.4.1.45037." + digits(V + PROJECT))[:63]

    ``V`` is the value **as stored, padding included** (``1.2.3.4.5\\0``). The top-level
    StudyInstanceUID loses one trailing NUL before hashing; a StudyInstanceUID inside a sequence
    becomes the file's new study UID. StudyID is ``digits(V_study + PROJECT)[:16]``,
    AccessionNumber (and any other ``hash`` element) ``digits(V)[:16]`` without the project.
    About one UID in eight ends in a component starting with ``0`` (invalid per PS3.5 §9.1):
    reproduced on purpose, the research PACS already holds such UIDs.
``mmiv-hex``
    The same with the plain hexadecimal digest (the tool's legacy ``-u`` mode).
``hmac``
    The default for new projects: HMAC-SHA256 with the project's secret over the UID (padding
    stripped) → 128 bits → an RFC 9562 version-8 UUID → ``2.25.<decimal>``. Always a valid UID,
    unlinkable across projects without the secrets.

``uid_global`` (MMIV's project-independent ``hashuid``) is ``2.25.`` of a SHA-256 of the value
under the ``mmiv`` schemes and of an HMAC with the node's global key under ``hmac``. MMIV's own
64-digit output for these tags is not reproduced: it is not a valid UID, and the research PACS
does not key on these elements.

Multi-valued UI elements are mapped value by value; under the ``mmiv`` schemes each value is
hashed padded as it would be stored alone (NUL to even length), so that a UID maps the same
whether it stands alone or in a list.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from typing import Final

__all__ = [
    "SCHEMES",
    "HmacScheme",
    "MmivScheme",
    "UidScheme",
    "make_scheme",
]

MMIV_ROOT: Final = b"1.3.6.1.4.1.45037."
_HEX_TO_DIGITS: Final = bytes.maketrans(b"abcdef", b"012345")
SCHEMES: Final = ("mmiv", "mmiv-hex", "hmac")
MIN_SECRET_BYTES: Final = 16


def _uuid_uid(digest: bytes) -> bytes:
    """``2.25.<decimal>`` of the first 128 bits of *digest*, shaped as a version-8 UUID."""
    raw = bytearray(digest[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom, RFC 9562 §5.8)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b"2.25." + str(int.from_bytes(raw, "big")).encode("ascii")


def _strip(value: bytes) -> bytes:
    return value.rstrip(b"\x00 ")


class UidScheme(ABC):
    """Maps UIDs and short identifiers for one project. Pure and deterministic."""

    name: str

    @abstractmethod
    def uid(self, stored: bytes) -> bytes:
        """New UID (unpadded ASCII) for one stored UID value (padding as stored)."""

    @abstractmethod
    def study_uid(self, stored: bytes) -> bytes:
        """New UID for the top-level StudyInstanceUID."""

    def nested_study_uid(self, stored: bytes, file_study: bytes | None) -> bytes:
        """New UID for a StudyInstanceUID inside a sequence (*file_study*: the file's new one)."""
        return self.uid(stored)

    @abstractmethod
    def uid_global(self, stored: bytes) -> bytes:
        """Project-independent new UID."""

    @abstractmethod
    def short_hash(self, stored: bytes, *, study_stored: bytes | None, is_study_id: bool) -> bytes:
        """16-digit replacement for AccessionNumber, StudyID and other ``hash`` elements."""

    def uid_in_list(self, value: bytes) -> bytes:
        """Map one value of a multi-valued UI element (no padding of its own)."""
        return self.uid(value)


class MmivScheme(UidScheme):
    """The MMIV DICOMAnonymizer's ``hashuid+PROJECTNAME`` (see the module docstring)."""

    def __init__(self, project: str, *, hex_digits: bool = False) -> None:
        self.name = "mmiv-hex" if hex_digits else "mmiv"
        self._project = project.encode("ascii")
        self._hex = hex_digits

    def _digits(self, data: bytes) -> bytes:
        hexed = hashlib.sha256(data).hexdigest().encode("ascii")
        return hexed if self._hex else hexed.translate(_HEX_TO_DIGITS)

    def uid(self, stored: bytes) -> bytes:
        return (MMIV_ROOT + self._digits(stored + self._project))[:63]

    def study_uid(self, stored: bytes) -> bytes:
        if stored.endswith(b"\x00"):
            stored = stored[:-1]
        return self.uid(stored)

    def nested_study_uid(self, stored: bytes, file_study: bytes | None) -> bytes:
        return file_study if file_study is not None else self.study_uid(stored)

    def uid_global(self, stored: bytes) -> bytes:
        return _uuid_uid(hashlib.sha256(b"fiona-uid-global\x00" + _strip(stored)).digest())

    def short_hash(self, stored: bytes, *, study_stored: bytes | None, is_study_id: bool) -> bytes:
        if is_study_id and study_stored is not None:
            if study_stored.endswith(b"\x00"):
                study_stored = study_stored[:-1]
            return self._digits(study_stored + self._project)[:16]
        return self._digits(stored)[:16]

    def uid_in_list(self, value: bytes) -> bytes:
        return self.uid(value + b"\x00" if len(value) % 2 else value)


class HmacScheme(UidScheme):
    """Keyed, valid ``2.25.`` UIDs (see the module docstring)."""

    name = "hmac"

    def __init__(self, secret: bytes, global_key: bytes | None = None) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the project secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._global_key = global_key

    def _mac(self, key: bytes, purpose: bytes, value: bytes) -> bytes:
        return hmac.new(key, purpose + b"\x00" + value, hashlib.sha256).digest()

    def uid(self, stored: bytes) -> bytes:
        return _uuid_uid(self._mac(self._secret, b"uid", _strip(stored)))

    def study_uid(self, stored: bytes) -> bytes:
        return self.uid(stored)

    def uid_global(self, stored: bytes) -> bytes:
        value = _strip(stored)
        if self._global_key is None:
            return _uuid_uid(hashlib.sha256(b"fiona-uid-global\x00" + value).digest())
        return _uuid_uid(self._mac(self._global_key, b"uid-global", value))

    def short_hash(self, stored: bytes, *, study_stored: bytes | None, is_study_id: bool) -> bytes:
        number = int.from_bytes(self._mac(self._secret, b"hash", _strip(stored))[:8], "big")
        return b"%016d" % (number % 10**16)

    def __repr__(self) -> str:  # never show the secret
        return "HmacScheme(<secret>)"


def make_scheme(
    name: str, project: str, *, secret: bytes | None = None, global_key: bytes | None = None
) -> UidScheme:
    """Build the scheme *name* (``mmiv``, ``mmiv-hex`` or ``hmac``) for *project*."""
    if name == "mmiv":
        return MmivScheme(project)
    if name == "mmiv-hex":
        return MmivScheme(project, hex_digits=True)
    if name == "hmac":
        if secret is None:
            raise ValueError("the hmac UID scheme needs the project's secret (secret_file)")
        return HmacScheme(secret, global_key)
    raise ValueError(f"unknown UID scheme {name!r}; choose one of {', '.join(SCHEMES)}")
