"""The de-identification engine: rewrites a DICOM Part 10 byte stream element by element.

Why bytes and not pydicom datasets: de-identification touches a few dozen header elements of
a file whose bulk is pixel data. The engine walks the encoded elements once, copies unchanged
runs of bytes through as they are, rewrites the values its profile names and never decodes the
pixel data (any transfer syntax works, compressed included). That is what makes it several
times faster than a pydicom read-modify-write loop, and it is exact: what the profile keeps is
byte-identical to the input.

Rules
-----
* The profile's rules apply at every nesting depth. Rewritten sequences and their items are
  written with undefined length (valid in every transfer syntax), so no lengths need patching.
* Group length elements (gggg,0000) are dropped (retired; they would be wrong after edits).
* Private elements follow the profile's private policy, keyed by (group, private creator,
  element low byte); a kept private sequence is recursed into like any other.
* A UN element of undefined length (or a UN element the dictionary knows as a sequence) holds
  an Implicit VR Little Endian sequence (PS3.5 §6.2.2): it is recursed into as such.
* (0012,0062) PatientIdentityRemoved, (0012,0063) DeidentificationMethod and (0012,0064)
  DeidentificationMethodCodeSequence are always written by the engine.
* The file meta information is regenerated (new MediaStorageSOPInstanceUID, FIONA's
  implementation UID) with a zero preamble. A deflated dataset is inflated, rewritten and
  deflated again.
* Anything malformed (a length running past the end, a stray item tag) raises
  :class:`~fiona.errors.DeidentificationError` naming the element and offset; the caller keeps
  the original (quarantine), nothing is half-written.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from pydicom.charset import convert_encodings, custom_encoders, encode_string
from pydicom.datadict import dictionary_VR, private_dictionary_VR

from fiona import __version__
from fiona.anonymizer.bodyparts import DEFINED_TERMS
from fiona.anonymizer.codes import METHOD_CODES
from fiona.anonymizer.dates import shift_da, shift_dt
from fiona.anonymizer.profile import Action, Profile, Rule
from fiona.anonymizer.uids import UidScheme, _uuid_uid
from fiona.errors import DeidentificationError

__all__ = ["IMPLEMENTATION_CLASS_UID", "Context", "Result", "anonymize_bytes"]

UNDEFINED: Final = 0xFFFFFFFF
ITEM: Final = 0xFFFEE000
ITEM_DELIM: Final = 0xFFFEE00D
SEQ_DELIM: Final = 0xFFFEE0DD
STUDY_UID: Final = 0x0020000D
SERIES_UID: Final = 0x0020000E
SOP_UID: Final = 0x00080018
SOP_CLASS: Final = 0x00080016
CHARSET: Final = 0x00080005
STUDY_ID: Final = 0x00200010
PATIENT_NAME: Final = 0x00100010
PIXEL_DATA: Final = 0x7FE00010
IDENTITY_REMOVED: Final = 0x00120062
DEID_METHOD: Final = 0x00120063
DEID_CODES: Final = 0x00120064
LONGITUDINAL: Final = 0x00280303
# The top-level elements _note_top records (checked before the call: ~150 elements a file).
_NOTE_TAGS: Final = frozenset({CHARSET, SOP_CLASS, STUDY_UID, SERIES_UID, SOP_UID})
MODIFIED_DATES: Final = "113107"
FULL_DATES: Final = "113106"

IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
DEFLATED: Final = "1.2.840.10008.1.2.1.99"
IMPLEMENTATION_CLASS_UID: Final = _uuid_uid(
    hashlib.sha256(b"FIONA DICOM staging router").digest()
).decode("ascii")
IMPLEMENTATION_VERSION: Final = ("FIONA_" + __version__)[:16]

# VRs with a 4-byte length (and 2 reserved bytes) in explicit VR encodings.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TEXT_VRS: Final = frozenset({b"SH", b"LO", b"ST", b"LT", b"UT", b"UC", b"PN", b"UR"})
_MAX_LENGTH: Final = {
    b"AE": 16, b"AS": 4, b"CS": 16, b"DA": 8, b"DT": 26, b"LO": 64, b"PN": 324,
    b"SH": 16, b"ST": 1024, b"TM": 14, b"UI": 64, b"LT": 10240,
}  # fmt: skip
# UI elements that hold class, syntax or coding-scheme UIDs: never remapped.
_CLASS_UID_TAGS: Final = frozenset(
    {
        0x00020002, 0x00020010, 0x00020012, 0x00041510, 0x00041512, 0x0004151A,
        0x00080016, 0x0008001A, 0x0008001B, 0x00080062, 0x0008010C, 0x00080117,
        0x00080118, 0x0008040E, 0x00081150, 0x00081151, 0x0008115A, 0x00083002,
        0x00340003, 0x00400010, 0x04000010, 0x04000510, 0x30100052, 0x30100053,
    }
)  # fmt: skip
_WELL_KNOWN_ROOT: Final = b"1.2.840.10008."
_ITEM_LE: Final = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True, slots=True)
class Context:
    """Per-project (and per-subject) facts the profile's actions draw on.

    ``scheme`` maps UIDs (see :mod:`fiona.anonymizer.uids`); ``date_offset_days`` is the
    project's offset or the transfer request's own.
    """

    project: str
    pseudonym: str
    scheme: UidScheme
    date_offset_days: int = 0
    patient_name: str | None = None
    event: str = ""
    site: str = ""
    site_name: str = ""


@dataclass(frozen=True, slots=True)
class Result:
    """The de-identified Part 10 bytes and the new identifiers the pipeline records."""

    data: bytes
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    transfer_syntax_uid: str


class _Encoding:
    __slots__ = ("imp", "implicit", "little", "long_header", "short_header", "tag", "u16", "u32")

    def __init__(self, *, implicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.implicit = implicit
        self.little = little
        self.tag = struct.Struct(order + "HH")
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "L")
        self.long_header = struct.Struct(order + "HH2sHL")
        self.short_header = struct.Struct(order + "HH2sH")
        self.imp = struct.Struct(order + "HHL")

    def header(self, tag: int, vr: bytes, length: int) -> bytes:
        group, elem = tag >> 16, tag & 0xFFFF
        if self.implicit or group == 0xFFFE:  # items and delimiters have no VR
            return self.imp.pack(group, elem, length)
        if vr in _LONG_VRS:
            return self.long_header.pack(group, elem, vr, 0, length)
        if length > 0xFFFF:
            raise DeidentificationError(
                f"value of ({group:04X},{elem:04X}) is too long for VR {vr.decode()}"
            )
        return self.short_header.pack(group, elem, vr, length)


_EXPLICIT_LE: Final = _Encoding(implicit=False, little=True)
_IMPLICIT_LE: Final = _Encoding(implicit=True, little=True)
_EXPLICIT_BE: Final = _Encoding(implicit=False, little=False)


@lru_cache(maxsize=4096)
def _public_vr(tag: int) -> bytes | None:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr[:2].encode("ascii")


@lru_cache(maxsize=1024)
def _private_vr(tag: int, creator: str) -> bytes:
    try:
        return private_dictionary_VR(tag, creator)[:2].encode("ascii")
    except KeyError:
        return b"UN"


def _encodable(text: str, encodings: Sequence[str]) -> bool:
    """Whether one of *encodings* holds each character of *text* (none: ASCII only).

    pydicom's ``encode_string`` does not fail where no character set holds a character: it
    warns and writes "?" instead, which would put a wrong name into the output.
    """
    for char in set(text):
        for encoding in encodings:
            encoder = custom_encoders.get(encoding)
            try:
                if encoder is None:
                    char.encode(encoding)
                else:
                    encoder(char, "strict")
            except (UnicodeError, LookupError, ValueError):
                continue
            break
        else:
            return False
    return True


def _malformed(tag: int, pos: int, what: str) -> DeidentificationError:
    return DeidentificationError(
        f"malformed dataset: ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos} {what}"
    )


def _pad(vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        return value + (b"\x00" if vr in (b"UI", b"OB", b"UN") else b" ")
    return value


def _encode(text: str, vr: bytes, tag: int, encodings: Sequence[str]) -> bytes:
    """*text* in the dataset's character set (*encodings*; empty: ASCII), within the VR's limit."""
    try:
        value = text.encode("ascii")
    except UnicodeEncodeError:
        try:
            if not _encodable(text, encodings):
                raise ValueError("no character set of the dataset holds the value")
            value = encode_string(text, encodings)
        except (UnicodeEncodeError, LookupError, ValueError):
            raise DeidentificationError(
                f"the value for ({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be written in "
                "the dataset's character set (SpecificCharacterSet)"
            ) from None
    limit = _MAX_LENGTH.get(vr)
    if limit is not None and len(value) > limit:
        raise DeidentificationError(
            f"the value for ({tag >> 16:04X},{tag & 0xFFFF:04X}) is {len(value)} bytes; "
            f"VR {vr.decode()} allows {limit}"
        )
    return value


@dataclass(frozen=True, slots=True)
class _Texts:
    """What ``replace`` and ``pseudonym`` values are made of: the context without its UID
    scheme (so without any secret) and the profile's name and version. Hashable: part of the
    key of :func:`_encoded_additions`."""

    project: str
    pseudonym: str
    patient_name: str | None
    date_offset_days: int
    event: str
    site: str
    site_name: str
    profile: str
    version: str

    def render(self, rule: Rule, tag: int, vr: bytes, encodings: Sequence[str]) -> bytes:
        """The encoded value of a ``replace`` or ``pseudonym`` *rule* for *tag*."""
        if rule.action == Action.PSEUDONYM:
            text = self.pseudonym
            if tag == PATIENT_NAME and self.patient_name:
                text = self.patient_name
        else:
            fields = {
                "project": self.project,
                "pseudonym": self.pseudonym,
                "event": self.event,
                "site": self.site,
                "site_name": self.site_name,
                "profile": self.profile,
                "version": self.version,
            }
            text = (rule.template or "").format_map(fields)
            if tag == LONGITUDINAL and text == "MODIFIED" and not self.date_offset_days:
                text = "UNMODIFIED"  # an offset of 0 leaves the dates as they were
        return _encode(text, vr, tag, encodings)


@lru_cache(maxsize=128)
def _encoded_additions(
    additions: tuple[tuple[int, Rule], ...],
    label: str,
    method_codes: tuple[str, ...],
    texts: _Texts,
    enc: _Encoding,
    encodings: tuple[str, ...],
) -> tuple[tuple[int, bytes, bool], ...]:
    """Elements the top level gains: (tag, encoded element, replaces an existing one).

    Cached: they are the same for every file of a project, subject, encoding and character
    set, and encoding them anew cost ~13 µs a file (~4%). The function is pure, so its
    arguments are the whole key: the profile's additions, label and method codes (its content,
    not its identity), the context's texts and date offset (not its UID scheme: no secret is
    held, and none of these values is a UID), the encoding (one of the three module-level
    ones, by identity) and the dataset's character sets. Errors are not cached (raised anew
    on each call). Thread-safe: lru_cache locks, and the result is immutable.
    """
    items: list[tuple[int, bytes, bool]] = []
    for tag, rule in additions:
        vr = _public_vr(tag) or b"LO"
        value = texts.render(rule, tag, vr, encodings)
        if value:
            value = _pad(vr, value)
            items.append((tag, enc.header(tag, vr, len(value)) + value, False))
    items.append((IDENTITY_REMOVED, enc.header(IDENTITY_REMOVED, b"CS", 4) + b"YES ", True))
    method = _pad(b"LO", _encode(f"FIONA {label}", b"LO", DEID_METHOD, encodings))
    items.append((DEID_METHOD, enc.header(DEID_METHOD, b"LO", len(method)) + method, True))
    codes = [enc.header(DEID_CODES, b"SQ", UNDEFINED)]
    for code in method_codes:
        if code == MODIFIED_DATES and not texts.date_offset_days:
            code = FULL_DATES
        codes.append(enc.header(ITEM, b"", UNDEFINED))
        for ctag, cvr, text in (
            (0x00080100, b"SH", code),
            (0x00080102, b"SH", "DCM"),
            (0x00080104, b"LO", METHOD_CODES[code]),
        ):
            raw = _pad(cvr, text.encode("ascii"))
            codes.append(enc.header(ctag, cvr, len(raw)) + raw)
        codes.append(enc.header(ITEM_DELIM, b"", 0))
    codes.append(enc.header(SEQ_DELIM, b"", 0))
    items.append((DEID_CODES, b"".join(codes), True))
    items.sort(key=lambda item: item[0])
    return tuple(items)


class _Rewriter:
    """State of one file's rewrite (one instance per call; not shared across threads)."""

    def __init__(
        self, data: bytes, start: int, profile: Profile, ctx: Context, enc: _Encoding
    ) -> None:
        self.enc = enc
        self.data = data
        self.view = memoryview(data)
        self.start = start
        self.profile = profile
        self.rules = profile.rules
        self.ctx = ctx
        self.scheme = ctx.scheme
        # Python codecs of the top-level SpecificCharacterSet; empty: the default repertoire
        # (ASCII), in which no other character can be written.
        self.encodings: list[str] = []
        self.study_stored: bytes | None = None
        self.study_scanned = False
        self.new_study: bytes | None = None
        self.new_series: bytes | None = None
        self.new_sop: bytes | None = None
        self.sop_class: bytes | None = None
        self.uid_map: dict[bytes, bytes] = {}
        self.texts = _Texts(
            project=ctx.project,
            pseudonym=ctx.pseudonym,
            patient_name=ctx.patient_name,
            date_offset_days=ctx.date_offset_days,
            event=ctx.event,
            site=ctx.site,
            site_name=ctx.site_name,
            profile=profile.name,
            version=str(profile.version),
        )

    # -- reading -------------------------------------------------------------------------

    def _header(
        self, pos: int, enc: _Encoding, creators: dict[int, str] | None
    ) -> tuple[int, bytes, int, int]:
        """(tag, vr, header length, value length) of the element at *pos*."""
        data = self.data
        group, elem = enc.tag.unpack_from(data, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:
            return tag, b"", 8, enc.u32.unpack_from(data, pos + 4)[0]
        if enc.implicit:
            length = enc.u32.unpack_from(data, pos + 4)[0]
            if length == UNDEFINED:
                vr = b"OB" if tag == PIXEL_DATA else b"SQ"  # encapsulated pixel data
            elif group % 2:
                if 0x10 <= elem <= 0xFF:
                    vr = b"LO"  # a private creator
                else:
                    creator = None if creators is None else creators.get(group << 8 | elem >> 8)
                    vr = b"UN" if creator is None else _private_vr(tag, creator)
            else:
                vr = _public_vr(tag) or b"UN"
            return tag, vr, 8, length
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            return tag, vr, 12, enc.u32.unpack_from(data, pos + 8)[0]
        return tag, vr, 8, enc.u16.unpack_from(data, pos + 6)[0]

    def _skip_undefined(self, pos: int, enc: _Encoding, tag: int) -> int:
        """Position after the sequence delimiter of an undefined-length value at *pos*."""
        size = len(self.data)
        while pos + 8 <= size:
            item_tag, _vr, _hlen, length = self._header(pos, enc, None)
            if item_tag == SEQ_DELIM:
                return pos + 8
            if item_tag != ITEM:
                raise _malformed(tag, pos, "holds something other than items")
            pos += 8
            if length == UNDEFINED:
                pos = self._skip_item(pos, enc, tag)
            else:
                pos += length
        raise _malformed(tag, pos, "has no sequence delimiter")

    def _skip_item(self, pos: int, enc: _Encoding, tag: int) -> int:
        size = len(self.data)
        while pos + 8 <= size:
            etag, vr, hlen, length = self._header(pos, enc, None)
            if etag == ITEM_DELIM:
                return pos + 8
            pos += hlen
            if length == UNDEFINED:
                inner = _IMPLICIT_LE if vr == b"UN" else enc
                pos = self._skip_undefined(pos, inner, etag)
            else:
                pos += length
        raise _malformed(tag, pos, "has an item without delimiter")

    def _element_end(
        self, pos: int, enc: _Encoding, tag: int, vr: bytes, hlen: int, length: int
    ) -> int:
        if length == UNDEFINED:
            return self._skip_undefined(pos + hlen, _IMPLICIT_LE if vr == b"UN" else enc, tag)
        end = pos + hlen + length
        if end > len(self.data):
            raise _malformed(tag, pos, "runs past the end of the data")
        return end

    def _top_level_study(self, enc: _Encoding) -> bytes | None:
        """The stored top-level StudyInstanceUID (found ahead of the rewrite when needed).

        Fast path: the rewrite needs the study UID before it reaches it (the first UID it maps,
        usually SOPInstanceUID (0008,0018), goes through _study_reference), so this look-ahead
        runs for nearly every file. It is a tight loop, one struct unpack per element and
        defined lengths skipped inline, doing what _header and _element_end would do, in the
        same order and with the same errors (a VR only matters here for undefined lengths).
        The top level is always read in the dataset's own encoding, whichever nested
        (possibly implicit-VR) sequence asks first.
        """
        enc = self.enc
        if self.study_scanned:
            return self.study_stored
        self.study_scanned = True
        data, pos, size = self.data, self.start, len(self.data)
        implicit = enc.implicit
        unpack_imp, unpack_short = enc.imp.unpack_from, enc.short_header.unpack_from
        unpack_u32 = enc.u32.unpack_from
        while pos + 8 <= size:
            if implicit:
                group, elem, length = unpack_imp(data, pos)
                vr, hlen = b"", 8  # undefined length: SQ or OB, never UN (see _header)
            else:
                group, elem, vr, length = unpack_short(data, pos)
                hlen = 8
                if group == 0xFFFE:
                    break  # an item tag: sorts after the study UID, the search ends
                if vr in _LONG_VRS:
                    hlen, length = 12, unpack_u32(data, pos + 8)[0]
            tag = group << 16 | elem
            if tag >= STUDY_UID:
                if tag == STUDY_UID:
                    self.study_stored = data[pos + hlen : pos + hlen + length]
                break
            if length == UNDEFINED:
                pos = self._skip_undefined(pos + hlen, _IMPLICIT_LE if vr == b"UN" else enc, tag)
            else:
                end = pos + hlen + length
                if end > size:
                    raise _malformed(tag, pos, "runs past the end of the data")
                pos = end
        return self.study_stored

    # -- values --------------------------------------------------------------------------

    def _render(self, rule: Rule, tag: int, vr: bytes) -> bytes:
        return self.texts.render(rule, tag, vr, self.encodings)

    def _map_uid(self, stored: bytes, tag: int, top: bool, enc: _Encoding) -> bytes:
        scheme = self.scheme
        if tag == STUDY_UID:
            if top:
                return scheme.study_uid(stored)
            file_study = self._file_study(enc)
            return scheme.nested_study_uid(stored, file_study)
        values = stored.split(b"\\")
        if len(values) == 1:
            if stored.rstrip(b"\x00 ").startswith(_WELL_KNOWN_ROOT):
                return stored.rstrip(b"\x00 ")
            new = self.uid_map.get(stored)
            if new is None:
                new = self._study_reference(stored, enc) or scheme.uid(stored)
                self.uid_map[stored] = new
            return new
        out = []
        for value in values:
            value = value.rstrip(b"\x00 ")
            if not value or value.startswith(_WELL_KNOWN_ROOT):
                out.append(value)
            else:
                out.append(self._study_reference(value, enc) or scheme.uid_in_list(value))
        return b"\\".join(out)

    def _study_reference(self, value: bytes, enc: _Encoding) -> bytes | None:
        """The file's new study UID when *value* is the file's study UID, else None.

        A study is referenced by other elements too (an RT structure set's RT Referenced Study
        Sequence names it as a ReferencedSOPInstanceUID). Under the ``mmiv`` schemes the
        top-level StudyInstanceUID is hashed without its NUL pad and any other UID with it, so
        without this the reference would not match the study it names.
        """
        study = self._top_level_study(enc)
        if study is None or value.rstrip(b"\x00 ") != study.rstrip(b"\x00 "):
            return None
        return self._file_study(enc)

    def _file_study(self, enc: _Encoding) -> bytes | None:
        if self.new_study is None:
            stored = self._top_level_study(enc)
            if stored is not None:
                self.new_study = self.scheme.study_uid(stored)
        return self.new_study

    def _value(
        self,
        action: Action,
        rule: Rule,
        tag: int,
        vr: bytes,
        value: bytes,
        top: bool,
        enc: _Encoding,
    ) -> bytes | None:
        """New value for *action*, or None to keep the element unchanged."""
        if action == Action.EMPTY:
            return b""
        if action in (Action.REPLACE, Action.PSEUDONYM):
            return self._render(rule, tag, vr)
        if not value.strip(b"\x00 "):
            return None
        if action == Action.UID:
            return self._map_uid(value, tag, top, enc)
        if action == Action.UID_GLOBAL:
            if value.rstrip(b"\x00 ").startswith(_WELL_KNOWN_ROOT):
                return None
            return self.scheme.uid_global(value)
        if action == Action.HASH:
            study = self._top_level_study(enc) if tag == STUDY_ID else None
            return self.scheme.short_hash(value, study_stored=study, is_study_id=tag == STUDY_ID)
        if action == Action.SHIFT_DATE:
            if vr == b"DA":
                return shift_da(value, self.ctx.date_offset_days)
            if vr == b"DT":
                return shift_dt(value, self.ctx.date_offset_days)
            return None
        if action == Action.BODYPART:
            term = value.strip(b"\x00 ").decode("ascii", "replace")
            return None if term in DEFINED_TERMS else b"BODYPART"
        if action == Action.CLEAN:
            if vr in (b"DA", b"DT"):
                return self._value(Action.SHIFT_DATE, rule, tag, vr, value, top, enc)
            if vr == b"UI":
                return self._value(Action.UID, rule, tag, vr, value, top, enc)
            return b"" if vr in _TEXT_VRS else None
        return None

    # -- rewriting -----------------------------------------------------------------------

    def _rule_for(self, tag: int, vr: bytes) -> Rule | None:
        """The rule of a public element; None means keep as it is."""
        rule = self.rules.get(tag)
        if rule is not None:
            return rule
        group = tag >> 16
        if 0x6000 <= group <= 0x601E:
            return _REMOVE if self.profile.remove_overlays else None
        if 0x5000 <= group <= 0x501E:
            return _REMOVE if self.profile.remove_curves else None
        if vr == b"UI" and self.profile.map_other_uids and tag not in _CLASS_UID_TAGS:
            return _UID
        if self.profile.default_remove and tag != PIXEL_DATA:
            return _REMOVE
        return None

    def _private_keep(self, tag: int, vr: bytes, creators: dict[int, str]) -> bool:
        """Whether a private element survives (see the profile's private policy).

        Person names are never kept on the strength of ``private_tags: keep`` alone: a private
        element whose VR is PN (as encoded, or by pydicom's private dictionary) is removed
        unless the profile safe-lists it by (group, creator, element).
        """
        policy = self.profile.private_policy
        if policy == "remove":
            return False
        group, elem = tag >> 16, tag & 0xFFFF
        if elem < 0x0100:  # a private creator element (or a group length)
            if elem >= 0x10:
                if policy == "keep":
                    return True
                creator = creators.get(group << 8 | elem)
                return any(
                    key[0] == group and key[1] == creator for key in self.profile.private_safelist
                )
            return False
        creator = creators.get(group << 8 | elem >> 8)
        if creator is None:  # no creator: nobody can say what it is
            return False
        key = (group, creator, elem & 0xFF)
        if key in self.profile.private_safelist:
            return True
        if policy != "keep" or key in self.profile.private_remove:
            return False
        # The dictionary is asked whatever the encoded VR: GE's (0009,1040) "Patient Object Name"
        # (GEMS_GENIE_1) is a PN written as LO.
        return vr != b"PN" and _private_vr(tag, creator) != b"PN"

    def rewrite(
        self, pos: int, end: int | None, enc: _Encoding, out: list[bytes | memoryview], top: bool
    ) -> int:
        """Rewrite the elements from *pos* up to *end* (None: up to an item delimiter).

        Returns the position where the walk stopped (*end*, or the item delimiter's position).
        """
        data, view, rules_for = self.data, self.view, self._rule_for
        size = len(data)
        limit = size if end is None else end
        implicit = enc.implicit
        unpack_short, unpack_u32 = enc.short_header.unpack_from, enc.u32.unpack_from
        creators: dict[int, str] = {}
        pending: list[tuple[int, bytes, bool]] = []
        if top:
            self._top_charset(pos, enc)  # the additions are written in the dataset's charset
            pending = self._top_additions()
        run = pos
        while pos < limit:
            if limit - pos < 8:
                raise _malformed(0, pos, "is a truncated element header")
            if implicit:
                tag, vr, hlen, length = self._header(pos, enc, creators)
            else:
                # Fast path, what _header does for explicit VR: one unpack of the short form.
                group, elem, vr, length = unpack_short(data, pos)
                tag, hlen = group << 16 | elem, 8
                if group == 0xFFFE:  # items and delimiters: no VR, a 4-byte length
                    vr, length = b"", unpack_u32(data, pos + 4)[0]
                elif vr in _LONG_VRS:
                    hlen, length = 12, unpack_u32(data, pos + 8)[0]
            if tag == ITEM_DELIM and end is None:
                break
            while pending and pending[0][0] <= tag:
                add_tag, encoded, forced = pending.pop(0)
                if add_tag < tag or forced:
                    if pos > run:
                        out.append(view[run:pos])
                    run = pos
                    out.append(encoded)
            if tag >> 16 == 0xFFFE:
                raise _malformed(tag, pos, "is an item tag outside a sequence")
            if length == UNDEFINED:
                elem_end = self._element_end(pos, enc, tag, vr, hlen, length)
            else:  # what _element_end does for a defined length, inline
                elem_end = pos + hlen + length
                if elem_end > size:
                    raise _malformed(tag, pos, "runs past the end of the data")
            is_sequence = vr == b"SQ" or (
                vr == b"UN"
                and (
                    length == UNDEFINED
                    or data[pos + hlen : pos + hlen + 4] == _ITEM_LE
                    or _public_vr(tag) == b"SQ"
                )
            )
            if top and tag in (IDENTITY_REMOVED, DEID_METHOD, DEID_CODES):
                rule: Rule | None = _REMOVE  # replaced by the engine's own, emitted above
            elif tag & 0xFFFF == 0 or tag >> 16 in (0x0000, 0x0002):
                rule = _REMOVE  # group lengths, command and file-meta elements in a dataset
            elif (tag >> 16) & 1:
                if 0x10 <= tag & 0xFFFF < 0x100:
                    creators[(tag >> 16) << 8 | tag & 0xFF] = (
                        data[pos + hlen : pos + hlen + length].rstrip(b"\x00 ").decode("latin-1")
                    )
                rule = None if self._private_keep(tag, vr, creators) else _REMOVE
            else:
                rule = rules_for(tag, vr)
                if (
                    rule is not None
                    and rule.action is Action.KEEP
                    and not is_sequence
                    and length != UNDEFINED
                ):
                    # Fast path: an explicit `keep` on a value does what no rule does (the
                    # bytes are copied as they are), without a _value call and without
                    # splitting the copied run. Kept sequences still recurse (below).
                    rule = None
            if rule is None and is_sequence:
                rule = _KEEP  # kept sequences are recursed into: rules apply at every depth
            if rule is None:
                if top and tag in _NOTE_TAGS:
                    self._note_top(tag, pos + hlen, length)
                pos = elem_end
                continue
            action = rule.action
            if pos > run:
                out.append(view[run:pos])
            run = elem_end
            if action == Action.REMOVE:
                pos = elem_end
                continue
            if is_sequence:
                if action == Action.EMPTY:
                    out.append(enc.header(tag, vr, 0))
                elif length != UNDEFINED and (vr == b"UN" or enc.implicit):
                    # Without an explicit SQ, a reader that does not know the tag tells a
                    # sequence only by its undefined length (CP-246) and warns about it, as
                    # dcmdump does: a defined length stays defined (the items are implicit VR).
                    items: list[bytes | memoryview] = []
                    self._sequence(pos + hlen, length, _IMPLICIT_LE, tag, items)
                    out.append(enc.header(tag, vr, sum(len(part) for part in items)))
                    out.extend(items)
                else:  # keep / clean: recurse into every item
                    inner = _IMPLICIT_LE if vr == b"UN" else enc
                    out.append(enc.header(tag, vr, UNDEFINED))
                    self._sequence(pos + hlen, length, inner, tag, out)
                    out.append(inner.header(SEQ_DELIM, b"", 0))
                pos = elem_end
                continue
            if length == UNDEFINED:  # encapsulated pixel data and the like: bytes as they are
                out.append(view[pos:elem_end])
                pos = elem_end
                continue
            value = data[pos + hlen : elem_end]
            out_vr = vr
            if vr == b"UN":
                out_vr = _public_vr(tag) or b"UN"
            new = self._value(action, rule, tag, out_vr, value, top, enc)
            if new is None:
                out.append(view[pos:elem_end])
            else:
                new = _pad(out_vr, new)
                out.append(enc.header(tag, out_vr if not enc.implicit else vr, len(new)))
                out.append(new)
                value = new
            if top and tag in _NOTE_TAGS:
                self._note_top(tag, -1, -1, value)
            pos = elem_end
        if pos > run:
            out.append(view[run:pos])
        for _add_tag, encoded, _forced in pending:
            out.append(encoded)
        return pos

    def _sequence(
        self, pos: int, length: int, enc: _Encoding, tag: int, out: list[bytes | memoryview]
    ) -> None:
        end = None if length == UNDEFINED else pos + length
        size = len(self.data)
        while (end is None or pos < end) and pos + 8 <= size:
            item_tag, _vr, _hlen, item_len = self._header(pos, enc, None)
            if item_tag == SEQ_DELIM:
                return
            if item_tag != ITEM:
                raise _malformed(tag, pos, "holds something other than items")
            out.append(enc.header(ITEM, b"", UNDEFINED))
            pos += 8
            if item_len == UNDEFINED:
                pos = self.rewrite(pos, None, enc, out, top=False)
                pos += 8  # the item delimiter
            else:
                if pos + item_len > size:
                    raise _malformed(tag, pos, "has an item running past the end")
                self.rewrite(pos, pos + item_len, enc, out, top=False)
                pos += item_len
            out.append(enc.header(ITEM_DELIM, b"", 0))
        if end is None:
            raise _malformed(tag, pos, "has no sequence delimiter")

    def _note_top(self, tag: int, vpos: int, length: int, value: bytes | None = None) -> None:
        if tag not in _NOTE_TAGS:
            return
        if value is None:
            value = self.data[vpos : vpos + length]
        clean = value.rstrip(b"\x00 ")
        if tag == CHARSET:
            names = [part.strip(b"\x00 ").decode("ascii", "replace") for part in value.split(b"\\")]
            if names == [""]:
                self.encodings = []
                return
            try:
                self.encodings = convert_encodings(names)
            except (ValueError, LookupError):
                raise DeidentificationError(
                    f"SpecificCharacterSet {value!r} names no character set"
                ) from None
        elif tag == SOP_CLASS:
            self.sop_class = clean
        elif tag == STUDY_UID:
            self.new_study = clean
        elif tag == SERIES_UID:
            self.new_series = clean
        else:
            self.new_sop = clean

    def _top_charset(self, pos: int, enc: _Encoding) -> None:
        """Read the top-level SpecificCharacterSet ahead of the rewrite (it comes first)."""
        size = len(self.data)
        while pos + 8 <= size:
            tag, vr, hlen, length = self._header(pos, enc, None)
            if tag >= CHARSET:
                if tag == CHARSET:
                    self._note_top(tag, pos + hlen, length)
                return
            pos = self._element_end(pos, enc, tag, vr, hlen, length)

    def _top_additions(self) -> list[tuple[int, bytes, bool]]:
        """Elements the top level gains (a fresh list: the rewrite consumes it)."""
        profile = self.profile
        return list(
            _encoded_additions(
                profile.additions,
                profile.label,
                profile.method_codes,
                self.texts,
                self.enc,
                tuple(self.encodings),
            )
        )


_REMOVE: Final = Rule(Action.REMOVE)
_KEEP: Final = Rule(Action.KEEP)
_UID: Final = Rule(Action.UID)


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    value = _pad(vr, value)
    return _EXPLICIT_LE.header(tag, vr, len(value)) + value


_VRS: Final = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)


def _looks_explicit(data: bytes, pos: int) -> bool:
    """Whether the element at *pos* carries a VR (pydicom's heuristic for mislabelled files)."""
    return data[pos + 4 : pos + 6] in _VRS


def _read_meta(data: bytes) -> tuple[int, dict[int, bytes]]:
    """Position of the dataset and the file meta elements of a Part 10 file.

    A bare dataset without preamble and meta (old ACR-NEMA style exports, some DVDs) is
    accepted when it starts with a group 0008 element; its encoding is detected.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        pos = 132
    elif data[:2] == b"\x02\x00":
        pos = 0  # meta information without a preamble
    elif data[:2] == b"\x08\x00" and len(data) >= 8:
        syntax = EXPLICIT_LE if _looks_explicit(data, 0) else IMPLICIT_LE
        return 0, {0x00020010: syntax.encode("ascii")}
    elif data[:2] == b"\x00\x08" and _looks_explicit(data, 0):
        return 0, {0x00020010: EXPLICIT_BE.encode("ascii")}
    else:
        raise DeidentificationError("not a DICOM file (no DICM prefix, no file meta, no dataset)")
    meta: dict[int, bytes] = {}
    unpack_tag, u16, u32 = _EXPLICIT_LE.tag.unpack_from, _EXPLICIT_LE.u16, _EXPLICIT_LE.u32
    try:
        while pos + 8 <= len(data):
            group, elem = unpack_tag(data, pos)
            if group != 0x0002:
                break
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                length, hlen = u32.unpack_from(data, pos + 8)[0], 12
            else:
                length, hlen = u16.unpack_from(data, pos + 6)[0], 8
            if pos + hlen + length > len(data):
                raise DeidentificationError("the file meta information is truncated")
            meta[group << 16 | elem] = data[pos + hlen : pos + hlen + length]
            pos += hlen + length
    except struct.error:
        raise DeidentificationError("the file meta information is truncated") from None
    if 0x00020010 not in meta and len(data) >= pos + 8:
        # No TransferSyntaxUID: a little endian dataset, its VR encoding told by its bytes.
        syntax = EXPLICIT_LE if _looks_explicit(data, pos) else IMPLICIT_LE
        meta[0x00020010] = syntax.encode("ascii")
    if 0x00020010 not in meta:
        raise DeidentificationError("the file meta information has no TransferSyntaxUID")
    return pos, meta


def anonymize_bytes(data: bytes, profile: Profile, context: Context) -> Result:
    """De-identify one DICOM Part 10 file given as bytes. Pure and deterministic."""
    start, meta = _read_meta(data)
    try:
        syntax = meta[0x00020010].rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise DeidentificationError("the TransferSyntaxUID is not a UID") from None
    body = data
    if syntax == DEFLATED:
        try:
            body = data[:start] + zlib.decompress(data[start:], -zlib.MAX_WBITS)
        except zlib.error:
            raise DeidentificationError("the deflated dataset cannot be inflated") from None
    if syntax == IMPLICIT_LE:
        enc = _IMPLICIT_LE
    elif syntax == EXPLICIT_BE:
        enc = _EXPLICIT_BE
    else:
        enc = _EXPLICIT_LE
    if len(body) >= start + 8 and enc.implicit == _looks_explicit(body, start):
        # The meta information names the wrong encoding; read the dataset as it is written
        # (as pydicom does) and leave it so: the output is as readable as the input.
        enc = _IMPLICIT_LE if not enc.implicit else _EXPLICIT_LE
    writer = _Rewriter(body, start, profile, context, enc)
    out: list[bytes | memoryview] = []
    try:
        writer.rewrite(start, len(body), enc, out, top=True)
    except struct.error:
        raise DeidentificationError("malformed dataset: an element header is truncated") from None
    if syntax == DEFLATED:
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = [packer.compress(b"".join(out)), packer.flush()]
    sop_class = writer.sop_class or meta.get(0x00020002, b"").rstrip(b"\x00 ")
    sop_uid = writer.new_sop
    if sop_uid is None and meta.get(0x00020003, b"").rstrip(b"\x00 "):
        sop_uid = writer.scheme.uid(meta[0x00020003])
    elements = [
        _meta_element(0x00020001, b"OB", b"\x00\x01"),
        _meta_element(0x00020002, b"UI", sop_class),
        _meta_element(0x00020003, b"UI", sop_uid or b""),
        _meta_element(0x00020010, b"UI", syntax.encode("ascii")),
        _meta_element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _meta_element(0x00020013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
    ]
    group = b"".join(elements)
    header = (
        b"\x00" * 128 + b"DICM" + _meta_element(0x00020000, b"UL", struct.pack("<L", len(group)))
    )
    return Result(
        # One join: the dataset (mostly pixel data) is copied once, not joined and then
        # copied again by a concatenation.
        data=b"".join([header, group, *out]),
        study_instance_uid=_text(writer.new_study),
        series_instance_uid=_text(writer.new_series),
        sop_instance_uid=_text(sop_uid),
        sop_class_uid=_text(sop_class),
        transfer_syntax_uid=syntax,
    )


def _text(value: bytes | None) -> str | None:
    return None if not value else value.rstrip(b"\x00 ").decode("ascii", "replace")
