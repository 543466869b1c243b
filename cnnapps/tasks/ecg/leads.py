"""Which signals of a WFDB record are ECG leads, and which of them a model reads.

Lead names differ between databases for the same electrode placement (MIT-BIH's modified limb lead ``MLII`` is
lead ``II`` of a 12-lead record; ``D2`` in European files; ``ECG II`` on bedside monitors). Names are compared
through a canonical form (``canonical_lead``):

==========================================  =========================================================
names (case, spaces, ``-`` and ``_`` ignored; a leading ``lead``, ``ecg`` or ``ekg`` dropped)  canonical
==========================================  =========================================================
``I``, ``MLI``, ``D1``, ``DI``                                        ``I``
``II``, ``MLII``, ``D2``, ``DII``                                     ``II``
``III``, ``MLIII``, ``D3``, ``DIII``                                  ``III``
``aVR``, ``aVL``, ``aVF`` (any case)                                  ``aVR``, ``aVL``, ``aVF``
``V1`` ... ``V9``, ``MV1`` ... ``MV6``, ``MCL1`` ... ``MCL6``          ``V1`` ... ``V9``
``V3R`` ... ``V6R``                                                   ``V3R`` ... ``V6R``
``X``, ``Y``, ``Z`` (Frank leads)                                     ``X``, ``Y``, ``Z``
==========================================  =========================================================

A requested name matches a signal whose name is the same text (case-insensitive) or has the same canonical
form; so ``MLII`` finds ``II`` and ``II`` finds ``MLII``. The modified leads (MLII, MV1, MCL1) approximate
their standard counterparts; a model trained on one reads the other, which is what a user asking for "lead II"
of a Holter record wants.

Bedside-monitor records mix ECG with other signals: a photoplethysmogram (``PLETH``, ``PPG``, ``SpO2``),
respiration (``RESP``, impedance), arterial and venous pressures (``ABP``, ``ART``, ``PAP``, ``CVP``, ...),
CO2, temperature, EEG/EOG/EMG. ``signal_kind`` sorts a signal by its name first and its units second:

- a known ECG lead name or a generic ECG name (``ECG``, ``ECG1``, ``EKG``, ``V``, ``MCL``) is ECG, unless its units
  are clearly not a voltage (``mmHg``, ``%``, ``bpm``, ...);
- a known non-ECG name is that kind, whatever its units;
- any other name is ECG when its units are a voltage (``mV``, ``uV``, ``V``; a header without units means mV,
  by the WFDB specification), else ``unknown``.

Only ECG signals are ever read as leads; a record without one is refused (``no_ecg_signal``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

ALL = "all"  # data.leads = "all": every ECG lead of the first record read, in its order
STANDARD_12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

_LIMB = {"i": "I", "ii": "II", "iii": "III", "mli": "I", "mlii": "II", "mliii": "III", "d1": "I", "d2": "II",
         "d3": "III", "di": "I", "dii": "II", "diii": "III", "avr": "aVR", "avl": "aVL", "avf": "aVF",
         "x": "X", "y": "Y", "z": "Z"}
_CHEST = re.compile(r"(?:m|mcl)?v?([1-9])(r?)$")  # V1, MV1, MCL1 (chest), V4R (right-sided)
_GENERIC_ECG = {"ecg", "v", "mcl", "cm5", "cc5"}
# Names of non-ECG signals, as prefixes of the normalised (lower-case, separator-free) name -> kind.
_OTHER_PREFIXES: tuple[tuple[str, str], ...] = (
    ("pleth", "ppg"), ("ppg", "ppg"), ("spo2", "ppg"), ("sao2", "ppg"), ("pulse", "ppg"),
    ("resp", "resp"), ("imp", "resp"), ("thor", "resp"), ("abdo", "resp"), ("airflow", "resp"),
    ("flow", "resp"), ("nasal", "resp"), ("abp", "pressure"), ("art", "pressure"), ("aobp", "pressure"),
    ("nbp", "pressure"), ("nibp", "pressure"), ("pap", "pressure"), ("cvp", "pressure"), ("icp", "pressure"),
    ("lap", "pressure"), ("rap", "pressure"), ("uap", "pressure"), ("fap", "pressure"), ("cpp", "pressure"),
    ("bp", "pressure"), ("co2", "gas"), ("etco2", "gas"), ("awp", "gas"), ("awf", "gas"), ("temp", "temperature"),
    ("eeg", "eeg"), ("eog", "eog"), ("emg", "emg"), ("pcg", "sound"), ("sound", "sound"), ("phono", "sound"),
    ("scg", "motion"), ("bcg", "motion"), ("acc", "motion"), ("eda", "skin"), ("gsr", "skin"),
)
_OTHER_EXACT = {"hr": "rate", "pr": "rate", "rr": "rate", "sv": "pressure", "p": "pressure", "o2": "gas"}
_VOLTAGE_UNITS = {"mv", "uv", "µv", "μv", "v", "nv", "millivolt", "millivolts", "microvolt", "microvolts"}
_NON_VOLTAGE_UNITS = {"mmhg", "kpa", "cmh2o", "%", "bpm", "/min", "1/min", "ohm", "ohms", "l/s", "l/min", "ml",
                      "ml/s", "degc", "°c", "c", "deg", "nu", "pm", "g", "m/s2"}


def _normal(name: str) -> str:
    """Lower case without separators, a leading ``lead``/``ecg``/``ekg`` dropped (``ECG lead II`` -> ``ii``);
    a bare or numbered channel (``ECG``, ``ECG1``) -> ``ecg``."""
    s = re.sub(r"[\s_\-.()]+", "", str(name).lower())
    stripped = True
    while stripped:
        stripped = False
        for prefix in ("lead", "ecg", "ekg"):
            if s.startswith(prefix):
                rest = s[len(prefix):]
                if not rest or rest.isdigit():  # "ECG1" is a channel number, not lead I
                    return "ecg"
                s, stripped = rest, True
    return s


def canonical_lead(name: str) -> str | None:
    """The standard name of ECG lead ``name`` (``MLII`` -> ``II``, ``mv1`` -> ``V1``), or None when ``name`` is
    not a known lead name (a generic ``ECG`` channel, another signal)."""
    s = _normal(name)
    if s in _LIMB:
        return _LIMB[s]
    m = _CHEST.match(s)
    if m and (s.startswith(("v", "mv", "mcl"))):
        return f"V{m.group(1)}{'R' if m.group(2) else ''}"
    return None


def signal_kind(name: str, units: str = "mV") -> str:
    """``ecg``, or what else the signal is (``ppg``, ``resp``, ``pressure``, ``gas``, ``temperature``, ``eeg``,
    ``eog``, ``emg``, ``sound``, ``motion``, ``skin``, ``rate``, ``non-voltage``, ``unknown``), from its name and
    units (see the module's rules)."""
    s = _normal(name)
    u = str(units or "mV").strip().lower()
    known_lead = canonical_lead(name) is not None or s in _GENERIC_ECG
    if known_lead:
        return "non-voltage" if u in _NON_VOLTAGE_UNITS and u != "nu" else "ecg"
    if s in _OTHER_EXACT:
        return _OTHER_EXACT[s]
    for prefix, kind in _OTHER_PREFIXES:
        if s.startswith(prefix):
            return kind
    if u in _VOLTAGE_UNITS:
        return "ecg"
    return "non-voltage" if u in _NON_VOLTAGE_UNITS else "unknown"


def same_lead(a: str, b: str) -> bool:
    """Whether two signal names denote the same lead: equal text (case-insensitive) or equal canonical form."""
    if str(a).strip().lower() == str(b).strip().lower():
        return True
    ca, cb = canonical_lead(a), canonical_lead(b)
    return ca is not None and ca == cb


def describe(names: Sequence[str], units: Sequence[str]) -> str:
    """``"MLII (mV, ecg), PLETH (NU, ppg)"``: a record's signals for messages."""
    return ", ".join(f"{n} ({u}, {signal_kind(n, u)})" for n, u in zip(names, units))


class LeadError(ValueError):
    """The record cannot give the wanted leads; ``reason`` is ``no_ecg_signal`` or ``lead_not_found``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class LeadChoice:
    """The signals to read: ``indices`` into the record's signals, the record's ``names`` of them, and
    ``substituted`` {wanted lead: signal read in its place} for wanted leads the record lacks."""

    indices: list[int]
    names: list[str]
    substituted: dict[str, str] = field(default_factory=dict)


def choose_leads(sig_names: Sequence[str], units: Sequence[str], wanted: Sequence[str], where: str,
                 substitute: bool = False) -> LeadChoice:
    """Pick the signals of a record for the ``wanted`` leads (``[]``: its first ECG signal; ``["all"]``: every
    ECG signal, in record order).

    A wanted lead matches a signal by ``same_lead``; signals that are not ECG (``signal_kind``) are never picked,
    whatever their position. A wanted lead the record lacks raises LeadError(``lead_not_found``), or, with
    ``substitute``, takes the first ECG signal not picked otherwise (the caller warns with ``substituted``).
    A record without any ECG signal raises LeadError(``no_ecg_signal``).
    """
    sig_names = [str(n) for n in sig_names]
    units = list(units) if units is not None else ["mV"] * len(sig_names)
    units = [str(u) if u is not None else "mV" for u in units] + ["mV"] * (len(sig_names) - len(units))
    ecg = [i for i, (n, u) in enumerate(zip(sig_names, units)) if signal_kind(n, u) == "ecg"]
    wanted = [str(w) for w in wanted]
    if [w.lower() for w in wanted] == [ALL]:
        if not ecg:
            raise LeadError("no_ecg_signal", f"{where}: no ECG signal among {describe(sig_names, units)}")
        return LeadChoice(ecg, [sig_names[i] for i in ecg])
    if not wanted:
        if not ecg:
            raise LeadError("no_ecg_signal", f"{where}: no ECG signal among {describe(sig_names, units)}")
        return LeadChoice([ecg[0]], [sig_names[ecg[0]]])
    if not ecg:
        raise LeadError("no_ecg_signal", f"{where}: no ECG signal among {describe(sig_names, units)} "
                        f"(wanted {', '.join(wanted)})")
    picked: list[int | None] = []
    for w in wanted:
        exact = [i for i in ecg if sig_names[i].strip().lower() == w.strip().lower() and i not in picked]
        alias = [i for i in ecg if same_lead(sig_names[i], w) and i not in picked]
        picked.append((exact or alias or [None])[0])
    substituted: dict[str, str] = {}
    missing = [w for w, i in zip(wanted, picked) if i is None]
    if missing:
        spare = [i for i in ecg if i not in picked]
        if not substitute or len(spare) < len(missing):
            others = [sig_names[i] for i in range(len(sig_names)) if i not in ecg]
            extra = f"; not ECG: {', '.join(others)}" if others else ""
            need = (f" ({len(wanted)} leads wanted, {len(ecg)} ECG signal(s) present)" if substitute else "")
            raise LeadError("lead_not_found", f"{where}: no lead {', '.join(map(repr, missing))}{need} "
                            f"(ECG signals: {', '.join(sig_names[i] for i in ecg)}{extra})")
        for k, w in enumerate(wanted):
            if picked[k] is None:
                picked[k] = spare.pop(0)
                substituted[w] = sig_names[picked[k]]
    indices = [int(i) for i in picked]  # type: ignore[arg-type]
    return LeadChoice(indices, [sig_names[i] for i in indices], substituted)


def parse_leads(value: Sequence[str] | str) -> list[str]:
    """``"MLII,V1"`` or ``["MLII", "V1"]`` -> ``["MLII", "V1"]``; ``"all"`` -> ``["all"]``. Raises ValueError on a
    repeated lead or ``all`` beside names."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if any(v.lower() == ALL for v in items):
        if len(items) > 1:
            raise ValueError(f"leads: 'all' stands alone, got {items}")
        return [ALL]
    seen: dict[str, str] = {}
    for v in items:
        key = canonical_lead(v) or v.lower()
        if key in seen:
            raise ValueError(f"leads: {v!r} names the same lead as {seen[key]!r}")
        seen[key] = v
    return items
