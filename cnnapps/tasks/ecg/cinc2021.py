"""PhysioNet/CinC Challenge 2020/2021 12-lead records: SNOMED CT codes on the ``# Dx:`` header line, and the
Challenge's scored classes.

A record's header holds comment lines such as ``# Age: 59``, ``# Sex: Female``, ``# Dx: 164934002,426783006``.
The Challenge scores a fixed list of diagnoses; a few pairs of codes count as one class ("equivalent classes":
complete and plain right bundle branch block, PAC and supraventricular premature beats, PVC and ventricular
premature beats, and in 2021 complete and plain left bundle branch block). ``SCORED_2021`` (26 classes from 30
codes) and ``SCORED_2020`` (24 classes from 27 codes) list them in the order of the Challenges' weight matrices
(evaluation-2021 and evaluation-2020 ``weights.csv``); codes outside a list are read but not scored.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScoredClass:
    """One scored diagnosis: a short name, the full name and its SNOMED CT code(s) (several: equivalent)."""

    abbr: str
    name: str
    codes: tuple[str, ...]


SCORED_2021: tuple[ScoredClass, ...] = (
    ScoredClass("AF", "atrial fibrillation", ("164889003",)),
    ScoredClass("AFL", "atrial flutter", ("164890007",)),
    ScoredClass("BBB", "bundle branch block", ("6374002",)),
    ScoredClass("Brady", "bradycardia", ("426627000",)),
    ScoredClass("LBBB", "(complete) left bundle branch block", ("733534002", "164909002")),
    ScoredClass("RBBB", "(complete) right bundle branch block", ("713427006", "59118001")),
    ScoredClass("IAVB", "1st degree AV block", ("270492004",)),
    ScoredClass("IRBBB", "incomplete right bundle branch block", ("713426002",)),
    ScoredClass("LAD", "left axis deviation", ("39732003",)),
    ScoredClass("LAnFB", "left anterior fascicular block", ("445118002",)),
    ScoredClass("LPR", "prolonged PR interval", ("164947007",)),
    ScoredClass("LQRSV", "low QRS voltages", ("251146004",)),
    ScoredClass("LQT", "prolonged QT interval", ("111975006",)),
    ScoredClass("NSIVCB", "nonspecific intraventricular conduction disorder", ("698252002",)),
    ScoredClass("NSR", "sinus rhythm", ("426783006",)),
    ScoredClass("PAC", "premature atrial contraction / supraventricular premature beats", ("284470004", "63593006")),
    ScoredClass("PR", "pacing rhythm", ("10370003",)),
    ScoredClass("PRWP", "poor R wave progression", ("365413008",)),
    ScoredClass("PVC", "premature ventricular contractions / ventricular premature beats", ("427172004", "17338001")),
    ScoredClass("QAb", "Q wave abnormal", ("164917005",)),
    ScoredClass("RAD", "right axis deviation", ("47665007",)),
    ScoredClass("SA", "sinus arrhythmia", ("427393009",)),
    ScoredClass("SB", "sinus bradycardia", ("426177001",)),
    ScoredClass("STach", "sinus tachycardia", ("427084000",)),
    ScoredClass("TAb", "T wave abnormal", ("164934002",)),
    ScoredClass("TInv", "T wave inversion", ("59931005",)),
)

_2020_ORDER = ("IAVB", "AF", "AFL", "Brady", "RBBB", "IRBBB", "LAnFB", "LAD", "LBBB", "LQRSV", "NSIVCB", "PR",
               "PAC", "PVC", "LPR", "LQT", "QAb", "RAD", "SA", "SB", "NSR", "STach", "TAb", "TInv")
_BY_ABBR = {c.abbr: c for c in SCORED_2021}
# 2020 has no BBB or PRWP, and its LBBB is the plain code only (the complete LBBB code joined it in 2021)
SCORED_2020: tuple[ScoredClass, ...] = tuple(
    ScoredClass("LBBB", "left bundle branch block", ("164909002",)) if a == "LBBB" else _BY_ABBR[a]
    for a in _2020_ORDER)
LABEL_SETS = {"scored2021": SCORED_2021, "scored2020": SCORED_2020}


def header_field(comments: Iterable[str], key: str) -> str | None:
    """The value of ``key`` on a header comment line (``"Dx: 1,2"`` -> ``"1,2"``; wfdb strips the ``#``), or
    None when no line names it."""
    want = key.lower()
    for line in comments:
        name, sep, value = str(line).lstrip("#").strip().partition(":")
        if sep and name.strip().lower() == want:
            return value.strip()
    return None


def dx_codes(comments: Iterable[str]) -> list[str] | None:
    """The SNOMED CT codes of the ``Dx:`` line, in order, duplicates dropped; None when the header has no Dx
    line. Raises ValueError naming the item when one is not a number."""
    value = header_field(comments, "Dx")
    if value is None:
        return None
    codes: list[str] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"Dx code {item!r} is not a SNOMED CT number")
        if item not in codes:
            codes.append(item)
    return codes


def class_table(label_set: str | Sequence[ScoredClass]) -> tuple[ScoredClass, ...]:
    """The scored classes of ``label_set`` ("scored2021" | "scored2020", or the classes themselves)."""
    if isinstance(label_set, str):
        if label_set not in LABEL_SETS:
            raise ValueError(f"unknown label set {label_set!r}; known: {', '.join(LABEL_SETS)}")
        return LABEL_SETS[label_set]
    return tuple(label_set)


def multi_hot(codes: Iterable[str], classes: Sequence[ScoredClass]) -> list[int]:
    """0/1 per class: 1 where one of the class's codes is among ``codes`` (equivalent codes count once)."""
    have = set(codes)
    return [int(any(c in have for c in cls.codes)) for cls in classes]


def code_names(classes: Sequence[ScoredClass] = SCORED_2021) -> dict[str, str]:
    """{SNOMED CT code: class abbreviation} for every code of ``classes``."""
    return {code: cls.abbr for cls in classes for code in cls.codes}
