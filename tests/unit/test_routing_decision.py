"""The routing decision, table-driven: project AE titles, rules, anchoring, OR/AND, pseudonyms."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fiona.config import FionaConfig
from fiona.errors import ConfigError
from fiona.router.decide import StudyFacts, decide
from fiona.router.rules import RuleSet, load_routing_rules, load_rules

TODAY = date(2026, 11, 22)
PACS = {"destinations": ["pacs"]}
PROJECTS = {
    "BICAM": {
        **PACS,
        "number": "P20_01",
        "ae_titles": ["BICAM"],
        "pseudonym_pattern": r"^BICAM\d{3}$",
        "approval": {"start": "2020-01-01", "end": "2030-12-31"},
    },
    "OLDIE": {**PACS, "approval": {"end": "2019-12-31"}},
    "OPEN": PACS,
}
DESTINATIONS = {"pacs": {"kind": "folder", "path": "/nonexistent"}}
CONFIG = FionaConfig.model_validate({"projects": PROJECTS, "destinations": DESTINATIONS})
HEADER = {"PatientID": "BICAM007", "PatientName": "BICAM^012", "Modality": "MR"}


def facts(calling: str = "MR3", called: str = "FIONA", **header: str) -> StudyFacts:
    return StudyFacts(calling, called, "10.0.0.5", {**HEADER, **header})


def rules(*items: dict[str, Any]) -> RuleSet:
    return RuleSet.model_validate({"rules": list(items), "sha256": "abc"})


def rule(id: str = "r1", **values: Any) -> dict[str, Any]:
    return {"id": id, "project": "BICAM", **values}


MMIV = rule(  # MMIV: (called OR calling AE) AND (PatientID OR PatientName), whichever matched
    "mmiv",
    any_of=[
        [{"called_ae": "TRUSTED"}, {"calling_ae": "TRUSTED"}],
        [{"PatientID": r"BICAM\d{3}"}, {"PatientName": r"BICAM\^?\d{3}"}],
    ],
    pseudonym={"first_of": ["PatientID", "PatientName"]},
)


@pytest.mark.parametrize(
    ("study", "ruleset", "project", "pseudonym", "origin", "held"),
    [
        # Mode B: the project AE title decides, the incoming PatientID is the pseudonym.
        (facts(called="BICAM"), rules(), "BICAM", "BICAM007", "ae-title", None),
        (facts(called="BICAM", PatientID="Nordmann"), rules(), "BICAM", "Nordmann", "ae-title",
         "does not match the project's pattern"),
        # ... and rules are not consulted for it.
        (facts(called="BICAM"), rules(rule(project="OPEN", match={"Modality": "MR"})),
         "BICAM", "BICAM007", "ae-title", None),
        # All keys of match must match; values are matched whole (anchored).
        (facts(), rules(rule(match={"calling_ae": "MR3", "PatientID": r"BICAM\d{3}"},
                             pseudonym="PatientID", event="baseline")),
         "BICAM", "BICAM007", "rule:r1", None),
        (facts(), rules(rule(match={"calling_ae": "MR", "PatientID": r"BICAM\d{3}"})),
         None, None, None, None),
        (facts(), rules(rule(match={"PatientID": r"BICAM"})), None, None, None, None),
        (facts(), rules(rule(match={"calling_ae": "CT1", "PatientID": r"BICAM\d{3}"})),
         None, None, None, None),
        # A key the study does not have never matches (not even .*).
        (facts(), rules(rule(match={"AccessionNumber": ".*"})), None, None, None, None),
        # Disabled rules are skipped; the first enabled match wins.
        (facts(), rules(rule("off", enabled=False, project="OPEN", match={"Modality": "MR"}),
                        rule("on", match={"Modality": "MR"}, pseudonym="PatientID")),
         "BICAM", "BICAM007", "rule:on", None),
        # MMIV semantics: trusted AE as caller or callee, PatientID or PatientName.
        (facts(calling="TRUSTED"), rules(MMIV), "BICAM", "BICAM007", "rule:mmiv", None),
        (facts(called="TRUSTED", PatientID="12345678901"), rules(MMIV),
         "BICAM", "BICAM^012", "rule:mmiv", "does not match the project's pattern"),
        (facts(calling="OTHER"), rules(MMIV), None, None, None, None),
        # A capture group of a pattern as the pseudonym.
        (facts(PatientName="Study^BICAM123"),
         rules(rule(match={"PatientName": r"Study\^(BICAM\d{3})"},
                    pseudonym={"from": "PatientName", "group": 1})),
         "BICAM", "BICAM123", "rule:r1", None),
        # No pseudonym in the rule: assigned, but held until someone gives one.
        (facts(), rules(rule(match={"Modality": "MR"})), "BICAM", "", "rule:r1",
         "the pseudonym is empty"),
        # A project named by its number; a project outside its approval window is held.
        (facts(), rules(rule(project="P20_01", match={"Modality": "MR"}, pseudonym="PatientID")),
         "BICAM", "BICAM007", "rule:r1", None),
        (facts(), rules(rule(project="OLDIE", match={"Modality": "MR"}, pseudonym="PatientID")),
         "OLDIE", "BICAM007", "rule:r1", "outside its approval window"),
    ],
)  # fmt: skip
def test_decision(
    study: StudyFacts,
    ruleset: RuleSet,
    project: str | None,
    pseudonym: str | None,
    origin: str | None,
    held: str | None,
) -> None:
    routing = decide(study, CONFIG, ruleset, TODAY)
    if project is None:
        assert routing.unassigned and "unassigned" in routing.trace[-1]
        return
    (decision,) = routing.decisions
    assert (decision.project, decision.pseudonym, decision.origin) == (project, pseudonym, origin)
    if held is None:
        assert decision.hold_reason is None
    else:
        assert held in (decision.hold_reason or "")


def test_continue_lets_later_rules_add_projects() -> None:
    ruleset = rules(
        rule("a", match={"Modality": "MR"}, pseudonym="PatientID", **{"continue": True}),
        rule("b", project="OPEN", match={"Modality": "MR"}, pseudonym="PatientID", event="e2"),
        rule("c", project="OLDIE", match={"Modality": "MR"}),
    )
    routing = decide(facts(), CONFIG, ruleset, TODAY)
    assert [(d.project, d.rule_id, d.event) for d in routing.decisions] == [
        ("BICAM", "a", ""),
        ("OPEN", "b", "e2"),
    ]


def test_the_trace_says_why_without_the_studys_values() -> None:
    ruleset = rules(
        rule("off", enabled=False, match={"Modality": "MR"}),
        rule("ae", match={"calling_ae": "CT9"}),
        rule("pid", match={"PatientID": r"X\d+"}),
    )
    routing = decide(facts(PatientName="Nordmann^Ola"), CONFIG, ruleset, TODAY)
    assert routing.trace == (
        "rule off: disabled",
        "rule ae: calling_ae does not match 'CT9'",
        "rule pid: PatientID does not match 'X\\\\d+'",
        "no project AE title, no rule matched: unassigned",
    )
    assert routing.ruleset_sha256 == "abc"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("rules: [{id: a, project: BICAM}]\n", "rules.0(a)", "needs match or any_of"),
        ("rules: [{id: a, project: BICAM, match: {Colour: x}}]\n", "rules.0(a).match",
         "nor a DICOM keyword"),
        ("rules: [{id: a, project: BICAM, match: {PatientID: '(['}}]\n", "rules.0(a).match",
         "not a regular expression"),
        ("rules: [{id: a, project: BICAM, match: {Modality: MR}},"
         " {id: a, project: BICAM, match: {Modality: CT}}]\n", "rules", "used twice"),
        ("rules: [{id: a, project: BICAM, match: {PatientID: x},"
         " pseudonym: {from: PatientID, group: 1}}]\n", "rules.0(a)", "fewer than 1 groups"),
        ("rules: [{id: a, project: BICAM, match: {Modality: MR}, colour: red}]\n",
         "rules.0(a).colour", "Extra inputs"),
        ("rules: [{id: a, project: NOPE, match: {Modality: MR}}]\n", "rules.0(a).project",
         "unknown project 'NOPE'"),
    ],
)  # fmt: skip
def test_rule_file_errors_name_the_file_rule_and_key(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    config = FionaConfig.model_validate(
        {"projects": PROJECTS, "destinations": DESTINATIONS, "routing": {"rules_file": path}}
    )
    with pytest.raises(ConfigError) as caught:
        load_routing_rules(config)
    message = str(caught.value)
    assert str(path) in message
    lines = [line for line in message.splitlines() if f"{key}: " in line]
    assert lines and words in " ".join(lines), message


def test_the_shipped_rules_file_loads_and_its_hash_names_its_bytes() -> None:
    path = Path(__file__).resolve().parents[2] / "rules" / "routing.yaml"
    ruleset = load_rules(path)
    assert ruleset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ruleset.rules and not any(rule.enabled for rule in ruleset.rules)  # examples only


def test_a_coupling_list_entry_decides_before_the_rules() -> None:
    from fiona.router.coupling import Coupling

    ruleset = rules(rule(project="OPEN", match={"Modality": "MR"}, pseudonym="PatientID"))
    entries = [Coupling(7, "P20_01", "BICAM099", "followup")]
    routing = decide(facts(), CONFIG, ruleset, TODAY, entries)
    (decision,) = routing.decisions
    assert (decision.project, decision.pseudonym, decision.event, decision.origin) == (
        "BICAM", "BICAM099", "followup", "coupling"
    )  # fmt: skip
    assert "rules are not consulted" in routing.trace[-1]
    # ... but not before the project AE title (the sender said which project it is).
    assert decide(facts(called="BICAM"), CONFIG, ruleset, TODAY, entries).decisions[0].origin == (
        "ae-title"
    )
