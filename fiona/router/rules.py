"""Routing rules (``rules/routing.yaml``): loaded, validated and hashed.

A rules file is a list under ``rules:``; each rule::

    - id: bicam-from-mr3              # unique; letters, digits, - _ .
      enabled: true                   # default true
      description: MR3 sends BICAM participants under their study id
      match: {calling_ae: MR3, PatientID: '^BICAM\\d{3}$'}   # all keys must match
      any_of:                         # optional: each group needs one matching alternative
        - [{called_ae: BICAM}, {calling_ae: BICAM}]
      project: BICAM                  # its id or number
      pseudonym: PatientID            # a key of match/any_of, {from: KEY, group: N}, or
                                      # {first_of: [PatientID, PatientName]}
      event: baseline
      continue: false                 # true: later rules are tried too

Keys are ``calling_ae``, ``called_ae``, ``peer_address`` or any DICOM keyword; values are
regular expressions matched against the whole value (anchored). A file that does not load is a
configuration error naming the file, the rule and the key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import keyword_dict

from fiona.config import FionaConfig
from fiona.errors import ConfigError

__all__ = ["FACT_KEYS", "PseudonymFrom", "Rule", "RuleSet", "load_routing_rules", "load_rules"]

FACT_KEYS = ("calling_ae", "called_ae", "peer_address")
"""Match keys taken from the association rather than the header."""


def _check_key(key: str) -> str:
    if key not in FACT_KEYS and key not in keyword_dict:
        raise ValueError(f"{key!r} is neither {', '.join(FACT_KEYS)} nor a DICOM keyword")
    return key


def _compile(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    return value


Match = dict[str, str]


def _check_match(value: Match) -> Match:
    for key, pattern in value.items():
        _check_key(key)
        _compile(pattern)
    return value


class PseudonymFrom(BaseModel):
    """Where a rule's pseudonym comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_: str | None = Field(default=None, alias="from")
    group: Annotated[int, Field(ge=0)] = 0
    first_of: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_way(self) -> PseudonymFrom:
        if (self.from_ is None) == (not self.first_of):
            raise ValueError("give either from (with an optional group) or first_of")
        return self


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    enabled: bool = True
    description: str = ""
    match: Match = {}
    any_of: tuple[tuple[Match, ...], ...] = ()
    project: str
    pseudonym: str | PseudonymFrom | None = None
    event: str = ""
    continue_: bool = Field(default=False, alias="continue")

    _match = field_validator("match")(_check_match)

    @field_validator("any_of")
    @classmethod
    def _any_of(cls, value: tuple[tuple[Match, ...], ...]) -> tuple[tuple[Match, ...], ...]:
        for group in value:
            if not group:
                raise ValueError("an any_of group needs at least one alternative")
            for alternative in group:
                _check_match(alternative)
        return value

    @model_validator(mode="after")
    def _something_to_match(self) -> Rule:
        if not self.match and not self.any_of:
            raise ValueError(
                "a rule needs match or any_of (a rule matching everything is a mistake)"
            )
        keys = self.keys()
        spec = self.pseudonym
        if isinstance(spec, str):
            _check_key(spec)
        elif isinstance(spec, PseudonymFrom):
            sources = (spec.from_,) if spec.from_ is not None else spec.first_of
            for key in sources:
                _check_key(key or "")
                if spec.from_ is not None and spec.group and key not in keys:
                    raise ValueError(f"pseudonym group {spec.group} of {key}: {key} is not matched")
            if spec.from_ is not None and spec.group:
                patterns = self.patterns(spec.from_)
                if any(re.compile(p).groups < spec.group for p in patterns):
                    raise ValueError(
                        f"the pattern for {spec.from_} has fewer than {spec.group} groups"
                    )
        return self

    def keys(self) -> set[str]:
        keys = set(self.match)
        for group in self.any_of:
            for alternative in group:
                keys.update(alternative)
        return keys

    def patterns(self, key: str) -> list[str]:
        found = [self.match[key]] if key in self.match else []
        for group in self.any_of:
            found += [alt[key] for alt in group if key in alt]
        return found


class RuleSet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[Rule, ...] = ()
    source: str = "<none>"
    sha256: str = ""
    """Hash of the file's bytes: audit rows name the ruleset a decision came from."""

    @field_validator("rules")
    @classmethod
    def _unique(cls, value: tuple[Rule, ...]) -> tuple[Rule, ...]:
        seen: set[str] = set()
        for rule in value:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
        return value


EMPTY = RuleSet(sha256=hashlib.sha256(b"").hexdigest())


def load_rules(path: Path | None) -> RuleSet:
    """Load and validate a rules file (None: no rules)."""
    if path is None:
        return EMPTY
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        raw = yaml.safe_load(data) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [("", "the top level must be a mapping with rules:")])
    try:
        return RuleSet.model_validate(
            {**raw, "source": str(path), "sha256": hashlib.sha256(data).hexdigest()}
        )
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = list(err["loc"])
            if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
                rules = raw.get("rules") or []
                rule = rules[loc[1]] if loc[1] < len(rules) else {}
                rule_id = rule.get("id") if isinstance(rule, dict) else None
                loc[1] = f"{loc[1]}({rule_id})" if rule_id else loc[1]
            problems.append((".".join(str(p) for p in loc), err["msg"]))
        raise ConfigError(str(path), problems) from None


def load_routing_rules(config: FionaConfig) -> RuleSet:
    """The rules of ``routing.rules_file``, each naming a configured project (id or number)."""
    rules = load_rules(config.routing.rules_file)
    problems = [
        (f"rules.{index}({rule.id}).project", f"unknown project {rule.project!r}")
        for index, rule in enumerate(rules.rules)
        if config.project_id(rule.project) is None
    ]
    if problems:
        raise ConfigError(rules.source, problems)
    return rules
