"""The routing decision: a pure function of the study's facts, the projects and the rules.

Order:

1. **Project AE title (mode B).** The called AE title is one of a project's ``ae_titles``: the
   study is that project's, and its sender is trusted: the pseudonym is the incoming PatientID
   (a request with a PatientID that does not fit the project's pattern is held for manual
   assignment). Rules are not consulted.
2. **Coupling list** (:mod:`fiona.router.coupling`): live entries naming the study (by its
   AccessionNumber or UID) decide — an admin's explicit word for this study; rules are not
   consulted.
3. **Rules**, in file order; disabled ones are skipped; the first match decides unless it says
   ``continue: true``.
4. Nothing matched: the study is **unassigned** (it waits in the spool for a request).

The trace says, rule by rule, why it did or did not match. It names keys and patterns, never
the values of the study (they may be a patient's name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date

from fiona.config import FionaConfig
from fiona.router.coupling import Coupling
from fiona.router.rules import FACT_KEYS, Match, PseudonymFrom, Rule, RuleSet

__all__ = ["Decision", "Routing", "StudyFacts", "decide"]


@dataclass(frozen=True)
class StudyFacts:
    """What routing may look at: the association the study came in on, and its header."""

    calling_ae: str
    called_ae: str
    peer_address: str
    header: Mapping[str, str]
    """DICOM keyword → value as text (absent attributes are absent)."""

    def value(self, key: str) -> str | None:
        if key in FACT_KEYS:
            return str(getattr(self, key))
        return self.header.get(key)


@dataclass(frozen=True)
class Decision:
    """The study goes to *project* under *pseudonym*."""

    project: str
    pseudonym: str
    pseudonym_source: str
    event: str
    origin: str
    """``ae-title`` or ``rule:<id>`` (``coupling`` for coupling-list entries)."""
    rule_id: str | None = None
    hold_reason: str | None = None
    """Why the request will be held (pattern mismatch, approval window…), if it will."""


@dataclass(frozen=True)
class Routing:
    decisions: tuple[Decision, ...]
    ruleset_sha256: str
    trace: tuple[str, ...] = field(default=())

    @property
    def unassigned(self) -> bool:
        return not self.decisions


def decide(
    facts: StudyFacts,
    config: FionaConfig,
    rules: RuleSet,
    today: date,
    coupling: Sequence[Coupling] = (),
) -> Routing:
    """Which projects *facts* belong to, and why (see the module docstring)."""
    from fiona.requests import project_hold_reason

    trace: list[str] = []
    for name, settings in config.projects.items():
        if facts.called_ae in settings.ae_titles:
            pseudonym = facts.header.get("PatientID", "")
            trace.append(f"called AE title {facts.called_ae} belongs to project {name}")
            decision = Decision(
                project=name,
                pseudonym=pseudonym,
                pseudonym_source="PatientID (trusted sender: project AE title)",
                event="",
                origin="ae-title",
                hold_reason=project_hold_reason(config, name, pseudonym, today),
            )
            return Routing((decision,), rules.sha256, tuple(trace))
    decisions: list[Decision] = []
    for entry in coupling:
        project = config.project_id(entry.project) or entry.project
        trace.append(f"coupling-list entry {entry.entry_id} names the study: project {project}")
        decisions.append(
            Decision(
                project=project,
                pseudonym=entry.pseudonym,
                pseudonym_source="coupling list (subjectid)",
                event=entry.event,
                origin="coupling",
                hold_reason=project_hold_reason(config, project, entry.pseudonym, today),
            )
        )
    if decisions:
        trace.append("the coupling list decides: rules are not consulted")
        return Routing(tuple(decisions), rules.sha256, tuple(trace))
    for rule in rules.rules:
        if not rule.enabled:
            trace.append(f"rule {rule.id}: disabled")
            continue
        matched, why = _match(rule, facts)
        if matched is None:
            trace.append(f"rule {rule.id}: {why}")
            continue
        project = config.project_id(rule.project) or rule.project
        pseudonym, source = _pseudonym(rule, facts, matched)
        trace.append(f"rule {rule.id}: matched → project {project}")
        decisions.append(
            Decision(
                project=project,
                pseudonym=pseudonym,
                pseudonym_source=source,
                event=rule.event,
                origin=f"rule:{rule.id}",
                rule_id=rule.id,
                hold_reason=project_hold_reason(config, project, pseudonym, today),
            )
        )
        if not rule.continue_:
            break
    if not decisions:
        trace.append("no project AE title, no rule matched: unassigned")
    return Routing(tuple(decisions), rules.sha256, tuple(trace))


def _match_all(match: Match, facts: StudyFacts) -> tuple[dict[str, re.Match[str]] | None, str]:
    found: dict[str, re.Match[str]] = {}
    for key, pattern in match.items():
        value = facts.value(key)
        if value is None:
            return None, f"{key} is absent"
        hit = re.fullmatch(pattern, value)
        if hit is None:
            return None, f"{key} does not match {pattern!r}"
        found[key] = hit
    return found, ""


def _match(rule: Rule, facts: StudyFacts) -> tuple[dict[str, re.Match[str]] | None, str]:
    """The matches of every key that matched (in order), or None and why not."""
    matched, why = _match_all(rule.match, facts)
    if matched is None:
        return None, why
    for group in rule.any_of:
        reasons = []
        for alternative in group:
            found, why = _match_all(alternative, facts)
            if found is not None:
                for key, hit in found.items():
                    matched.setdefault(key, hit)
                break
            reasons.append(why)
        else:
            return None, "no alternative matched (" + "; ".join(reasons) + ")"
    return matched, ""


def _pseudonym(rule: Rule, facts: StudyFacts, matched: dict[str, re.Match[str]]) -> tuple[str, str]:
    spec = rule.pseudonym
    if spec is None:
        return "", "none: the rule gives no pseudonym (assign one by hand)"
    if isinstance(spec, str):
        return facts.value(spec) or "", spec
    assert isinstance(spec, PseudonymFrom)
    if spec.from_ is not None:
        if spec.group:
            hit = matched.get(spec.from_)
            return (hit.group(spec.group) or "") if hit else "", f"{spec.from_} group {spec.group}"
        return facts.value(spec.from_) or "", spec.from_
    for key in spec.first_of:
        if key in matched:
            return facts.value(key) or "", key
    return "", f"none of {', '.join(spec.first_of)} matched"
