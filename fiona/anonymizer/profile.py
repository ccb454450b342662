"""De-identification profiles: YAML data validated and compiled into a tag → action table.

The format is documented in ``rules/profiles/README.md``. Built-in profiles are installed with
the package as ``fiona.profiles`` and found by name; a path to a YAML file works too.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydicom.datadict import dictionary_VR

from fiona.errors import ConfigError

__all__ = [
    "Action",
    "Profile",
    "Rule",
    "builtin_profiles",
    "load_profile",
]

_TAG_KEY = re.compile(r"^([0-9A-F]{4}),([0-9A-F]{4})$")
_HEX2 = re.compile(r"^[0-9A-F]{2}$")
_HEX4 = re.compile(r"^[0-9A-F]{4}$")
_FIELDS = ("project", "pseudonym", "event", "site", "site_name", "profile", "version")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Action(IntEnum):
    """What happens to one element (see ``rules/profiles/README.md``)."""

    KEEP = 0
    REMOVE = 1
    EMPTY = 2
    REPLACE = 3
    UID = 4
    UID_GLOBAL = 5
    HASH = 6
    SHIFT_DATE = 7
    PSEUDONYM = 8
    BODYPART = 9
    CLEAN = 10


_SIMPLE = {
    "keep": Action.KEEP,
    "remove": Action.REMOVE,
    "empty": Action.EMPTY,
    "uid": Action.UID,
    "uid_global": Action.UID_GLOBAL,
    "hash": Action.HASH,
    "shift_date": Action.SHIFT_DATE,
    "pseudonym": Action.PSEUDONYM,
    "bodypart": Action.BODYPART,
    "clean": Action.CLEAN,
}
# Actions that make sense on a sequence: keep/clean recurse, remove drops, empty has no items.
_SEQUENCE_ACTIONS = {Action.KEEP, Action.REMOVE, Action.EMPTY, Action.CLEAN}


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule: the action, a replacement template and whether to add it."""

    action: Action
    template: str | None = None
    add: bool = False


class _Replace(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    replace: str
    add: bool = False

    @field_validator("replace")
    @classmethod
    def _fields(cls, value: str) -> str:
        for name in re.findall(r"\{([^{}]*)\}", value):
            if name not in _FIELDS:
                raise ValueError(f"unknown substitution {{{name}}}; use one of {_FIELDS}")
        return value


class _Private(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    group: str
    creator: str = Field(min_length=1, max_length=64)
    element: str
    name: str | None = None

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        value = value.upper()
        if not _HEX4.match(value) or int(value, 16) % 2 == 0:
            raise ValueError(f"{value!r} is not a private (odd) group in 4 hex digits")
        return value

    @field_validator("element")
    @classmethod
    def _element(cls, value: str) -> str:
        value = value.upper()
        if not _HEX2.match(value):
            raise ValueError(f"{value!r} is not the low byte of an element in 2 hex digits")
        return value

    def key(self) -> tuple[int, str, int]:
        return int(self.group, 16), self.creator.strip(), int(self.element, 16)


class _ProfileModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    profile: str = Field(pattern=_NAME.pattern)
    version: int = Field(ge=1)
    description: str = ""
    default: Literal["keep", "remove"] = "keep"
    private_tags: Literal["keep", "remove", "safelist"] = "remove"
    private_safelist: tuple[_Private, ...] = ()
    private_remove: tuple[_Private, ...] = ()
    overlays: Literal["keep", "remove"] = "remove"
    curves: Literal["keep", "remove"] = "remove"
    other_uids: Literal["keep", "uid"] = "uid"
    method_codes: tuple[str, ...] = ()
    tags: dict[str, str | _Replace] = Field(default_factory=dict)

    @field_validator("method_codes")
    @classmethod
    def _codes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from fiona.anonymizer.codes import METHOD_CODES

        for code in value:
            if code not in METHOD_CODES:
                raise ValueError(f"{code!r} is not a CID 7050 de-identification method code")
        return value


@dataclass(frozen=True, slots=True)
class Profile:
    """A validated, compiled profile. ``digest`` is the SHA-256 of the YAML text."""

    name: str
    version: int
    description: str
    digest: str
    source: str
    rules: dict[int, Rule]
    default_remove: bool
    private_policy: str
    private_safelist: frozenset[tuple[int, str, int]]
    private_remove: frozenset[tuple[int, str, int]]
    remove_overlays: bool
    remove_curves: bool
    map_other_uids: bool
    method_codes: tuple[str, ...]
    additions: tuple[tuple[int, Rule], ...] = field(default=())

    @property
    def label(self) -> str:
        """``name v<version>`` as written into (0012,0063)."""
        return f"{self.name} v{self.version}"


def _compile_rule(key: str, raw: str | _Replace) -> tuple[int, Rule]:
    match = _TAG_KEY.match(key)
    if match is None:
        raise ValueError(f"tag key {key!r} must be 'GGGG,EEEE' in upper-case hex")
    tag = int(match[1] + match[2], 16)
    if tag >> 16 in (0x0000, 0x0002) or (tag >> 16) % 2:
        raise ValueError(
            f"{key}: rules name public dataset elements (not groups 0000/0002, not private)"
        )
    if isinstance(raw, _Replace):
        return tag, Rule(Action.REPLACE, raw.replace, raw.add)
    if raw not in _SIMPLE:
        raise ValueError(f"{key}: unknown action {raw!r}; use one of {sorted(_SIMPLE)} or replace")
    action = _SIMPLE[raw]
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = None
    if vr == "SQ" and action not in _SEQUENCE_ACTIONS:
        raise ValueError(f"{key} is a sequence: use keep, remove, empty or clean, not {raw}")
    if action in (Action.UID, Action.UID_GLOBAL) and vr is not None and "UI" not in vr:
        raise ValueError(f"{key} has VR {vr}: {raw} applies to UI elements only")
    return tag, Rule(action)


def _compile(model: _ProfileModel, text: str, source: str) -> Profile:
    rules: dict[int, Rule] = {}
    problems: list[tuple[str, str]] = []
    for key, raw in model.tags.items():
        try:
            tag, rule = _compile_rule(key, raw)
        except ValueError as exc:
            problems.append((f"tags.{key}", str(exc)))
            continue
        rules[tag] = rule
    if problems:
        raise ConfigError(source, problems)
    additions = tuple(sorted((tag, rule) for tag, rule in rules.items() if rule.add))
    return Profile(
        name=model.profile,
        version=model.version,
        description=model.description,
        digest=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        source=source,
        rules=rules,
        default_remove=model.default == "remove",
        private_policy=model.private_tags,
        private_safelist=frozenset(item.key() for item in model.private_safelist),
        private_remove=frozenset(item.key() for item in model.private_remove),
        remove_overlays=model.overlays == "remove",
        remove_curves=model.curves == "remove",
        map_other_uids=model.other_uids == "uid",
        method_codes=model.method_codes,
        additions=additions,
    )


def parse_profile(text: str, source: str) -> Profile:
    """Validate and compile profile YAML *text* (*source* names it in errors)."""
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", "a profile is a YAML mapping")])
    try:
        model = _ProfileModel.model_validate(raw)
    except ValidationError as exc:
        problems = [
            (".".join(str(part) for part in err["loc"]), err["msg"]) for err in exc.errors()
        ]
        raise ConfigError(source, problems) from None
    return _compile(model, text, source)


def builtin_profiles() -> list[str]:
    """Names of the profiles installed with FIONA."""
    folder = importlib.resources.files("fiona.profiles")
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a built-in profile by name, or a profile YAML file by path."""
    text_name = str(name_or_path)
    if _NAME.match(text_name) and not text_name.endswith((".yaml", ".yml")):
        resource = importlib.resources.files("fiona.profiles").joinpath(f"{text_name}.yaml")
        if not resource.is_file():
            raise ConfigError(
                text_name,
                [("", f"no built-in profile {text_name!r}; built-in: {builtin_profiles()}")],
            )
        profile = parse_profile(resource.read_text("utf-8"), f"profile {text_name}")
        if profile.name != text_name:
            raise ConfigError(text_name, [("profile", f"names {profile.name!r}")])
        return profile
    path = Path(name_or_path)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read the profile: {exc.strerror}")]) from None
    return parse_profile(text, str(path))
