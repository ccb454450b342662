"""De-identification: profiles as data, project-hashed UIDs, a pure byte-level engine.

The core is pure: ``(original bytes, profile, context) → new bytes``, deterministic (same input
and context ⇒ byte-identical output), pixel data never decoded::

    from fiona.anonymizer import Context, anonymize_bytes, load_profile, make_scheme

    profile = load_profile("mmiv")
    ctx = Context(project="BICAM", pseudonym="BICAM001", scheme=make_scheme("mmiv", "BICAM"),
                  date_offset_days=42)
    result = anonymize_bytes(original, profile, ctx)   # result.data, result.study_instance_uid

:func:`anonymize_dataset` does the same for a pydicom ``Dataset`` (encode, rewrite, decode).
"""

from __future__ import annotations

import io

from pydicom import Dataset, dcmread

from fiona.anonymizer.engine import IMPLEMENTATION_CLASS_UID, Context, Result, anonymize_bytes
from fiona.anonymizer.profile import Action, Profile, builtin_profiles, load_profile, parse_profile
from fiona.anonymizer.uids import SCHEMES, UidScheme, make_scheme

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "SCHEMES",
    "Action",
    "Context",
    "Profile",
    "Result",
    "UidScheme",
    "anonymize_bytes",
    "anonymize_dataset",
    "builtin_profiles",
    "load_profile",
    "make_scheme",
    "parse_profile",
]


def anonymize_dataset(dataset: Dataset, profile: Profile, context: Context) -> Dataset:
    """De-identify a pydicom dataset (with file meta) and return the new dataset."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    result = anonymize_bytes(buffer.getvalue(), profile, context)
    return dcmread(io.BytesIO(result.data))
