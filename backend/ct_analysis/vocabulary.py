"""What the built-in engine's ``ground`` can locate on CT, and the phrases that name it.

A phrase is matched, lower-cased, against each target's synonyms (whole words; the first target with a match wins,
in the order below, so "left lung nodule" is a lung nodule, not the left lung). Anything else is unsupported: the
engine returns no box and names this vocabulary (HTTP 200, ``findings: []``, a warning ``unsupported phrase``).

=================  ==============================================================================================
target             what is boxed (each box labelled with what was measured, never with the user's phrase)
=================  ==============================================================================================
lung nodule        the lung nodule candidates of :mod:`.nodules` (none: no box, and the text says so)
focal lesion       the focal lesion candidates of :mod:`.lesions`
calcification      dense (>= 130 HU) spots of 1-10 mm inside the closed lung fields only: elsewhere HU alone cannot
                   tell calcium from bone or contrast
right lung         the lung field on the image's left (radiological convention), :mod:`.tissue`
left lung          the lung field on the image's right
lung               both lung fields
spine              the largest bone component (>= 300 HU) in the middle third of the body's width
bone               bone components (>= 300 HU) of at least 20 mm², the largest first
fat                the largest fat component (-190..-30 HU)
fluid              the largest fluid-density component (-30..20 HU, at least 50 mm²)
air                gas inside the body outside the lung fields (airway, bowel gas)
=================  ==============================================================================================
"""

from __future__ import annotations

import re

#: target -> synonyms (whole-word phrases).
TARGETS: dict[str, tuple[str, ...]] = {
    "lung nodule": ("lung nodule", "pulmonary nodule", "nodule", "nodules", "lung mass", "pulmonary mass"),
    "focal lesion": ("focal lesion", "lesion", "lesions", "hypodense lesion", "hyperdense lesion"),
    "calcification": ("calcification", "calcifications", "calcified", "calcium", "granuloma"),
    "right lung": ("right lung", "right lung field", "rt lung", "right hemithorax"),
    "left lung": ("left lung", "left lung field", "lt lung", "left hemithorax"),
    "lung": ("lung", "lungs", "lung fields", "pulmonary parenchyma", "lung parenchyma"),
    "spine": ("spine", "vertebra", "vertebral body", "vertebrae", "spinal column"),
    "bone": ("bone", "bones", "skeleton", "osseous"),
    "fat": ("fat", "adipose", "adipose tissue", "subcutaneous fat"),
    "fluid": ("fluid", "water", "fluid collection", "fluid density"),
    "air": ("air", "gas", "airway", "trachea", "free air", "bowel gas"),
}


def match(phrase: str | None) -> str | None:
    """The target a phrase names, or None when it is outside the vocabulary."""
    text = " " + re.sub(r"[^a-z0-9]+", " ", (phrase or "").lower()).strip() + " "
    if not text.strip():
        return None
    for target, words in TARGETS.items():
        if any(f" {w} " in text for w in words):
            return target
    return None


def describe() -> str:
    """The vocabulary as one sentence, for the answer to an unsupported phrase."""
    return "; ".join(f"{t} ({', '.join(w[:3])})" for t, w in TARGETS.items())
