"""De-identification of DICOM objects after the DICOM PS3.15 Annex E basic profile.

What this does, per Table E.1-1 of the basic application level confidentiality profile:

- attributes that name or locate a person, an institution or a device, and every study/series/
  acquisition date and time, are removed (`X`) or, where the standard makes them type 2, kept
  as empty values (`Z`). That includes PatientSex (`Z`) and PatientAge/Size/Weight (`X`): they are
  only kept under the "Retain Patient Characteristics" option, which we do not claim;
- PatientName and PatientID are replaced with the caller's pseudonym;
- instance UIDs (everything outside the `1.2.840.10008.` standard root) are replaced (`U`) by
  `2.25.<int of sha256(uid)>`, so the same source UID always maps to the same new UID and a series
  stays a series across files;
- private tags and overlay groups (60xx, may hold burned text) are removed;
- PatientIdentityRemoved = YES, DeidentificationMethod and its code sequence are set.

The result is deterministic: the same bytes and pseudonym give the same output bytes.

NIfTI files carry free text too (`descrip`, `aux_file`, `intent_name`, `db_name`, and header
extensions, where converters may store the whole DICOM header): `deidentify_nifti` blanks them.

Legacy objects without preamble and file meta are read the same way (after `imaging` has seen a
run of well-formed data elements) and written back in the encoding they came in. After cleaning,
the output's header (pixel data left out) is searched for the original patient name, ID and birth
date; where one is still found (copied into an element the profile does not list) the object is
refused, never passed on. Values that identify nobody are not searched for (`is_placeholder`):
an export that was already anonymised (`Anonymous`, `19000101`, ...) passes.

A Siemens MOSAIC keeps one private element, (0019,xx0A) NumberOfImagesInMosaic of the
`SIEMENS MR HEADER` block: a count of slices, no patient data, without which the mosaic could not
be cut into its slices once the CSA headers (private) are gone.

An object that cannot be de-identified is never stored: the landing keeps a *withheld record* in
its place (`withheld_record`: a short text naming its sha256, size and the reason), which the
manifest quarantines under the original sha256.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import struct

from mri_assets.core.imaging import (
    SIEMENS_MR_HEADER,
    UnreadableImage,
    is_dicom,
    is_mosaic,
    mosaic_count,
)

EMPTY_KEYWORDS = (
    "AccessionNumber",
    "ContentDate",
    "ContentTime",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyID",
    "StudyTime",
)

REMOVED_KEYWORDS = (
    "AcquisitionDate",
    "AcquisitionDateTime",
    "AcquisitionTime",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "BranchOfService",
    "CountryOfResidence",
    "CurrentPatientLocation",
    "DeviceSerialNumber",
    "EthnicGroup",
    "FrameComments",
    "ImageComments",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "InstanceCreatorUID",
    "InstitutionAddress",
    "InstitutionCodeSequence",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "IssuerOfPatientID",
    "LastMenstrualDate",
    "MedicalAlerts",
    "MedicalRecordLocator",
    "MilitaryRank",
    "NameOfPhysiciansReadingStudy",
    "Occupation",
    "OperatorsName",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAddress",
    "PatientAge",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientComments",
    "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName",
    "PatientReligiousPreference",
    "PatientSize",
    "PatientState",
    "PatientTelephoneNumbers",
    "PatientWeight",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "PregnancyStatus",
    "ProtocolName",
    "ReferencedPatientSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence",
    "RequestAttributesSequence",
    "RequestingPhysician",
    "ResponsibleOrganization",
    "ResponsiblePerson",
    "SeriesDate",
    "SeriesDescription",
    "SeriesTime",
    "SmokingStatus",
    "StationName",
    "StudyDescription",
)

REPLACED_KEYWORDS = ("PatientName", "PatientID")

PHI_KEYWORDS = tuple(sorted(EMPTY_KEYWORDS + REMOVED_KEYWORDS + REPLACED_KEYWORDS))

STANDARD_UID_ROOT = "1.2.840.10008."
DEIDENTIFICATION_METHOD = "PS3.15 E.1-1 basic profile; UIDs 2.25.sha256 (mri_assets)"


def remapped_uid(uid: str) -> str:
    """Deterministic replacement for an instance UID: `2.25.` + 128 bits of sha256(uid)."""
    return "2.25." + str(int(hashlib.sha256(uid.encode()).hexdigest()[:32], 16))


def _clean_dataset(ds, pseudonym: str) -> None:
    for keyword in REMOVED_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword in EMPTY_KEYWORDS:
        if keyword in ds:
            ds.data_element(keyword).value = ""
    for keyword in REPLACED_KEYWORDS:
        if keyword in ds:
            ds.data_element(keyword).value = pseudonym
    for tag in [element.tag for element in ds if 0x6000 <= element.tag.group <= 0x60FF]:
        del ds[tag]
    for element in ds:
        if element.VR == "UI" and element.value:
            element.value = _remap_uid_value(element.value)
        elif element.VR == "SQ":
            for item in element.value:
                _clean_dataset(item, pseudonym)


def _remap_uid_value(value):
    if isinstance(value, str):
        return value if value.startswith(STANDARD_UID_ROOT) else remapped_uid(value)
    return [
        uid if str(uid).startswith(STANDARD_UID_ROOT) else remapped_uid(str(uid)) for uid in value
    ]


def _mark_deidentified(ds) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"


_CHECKED_IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate")

# Values anonymisers and PACS exports put in place of a name or ID, compared case-insensitively
# with the whole value or with each component of a person name (`Anon^Anon`); `anon...` is a prefix
PLACEHOLDER_WORDS = frozenset({
    "anonymous", "unknown", "none", "null", "nil", "n/a", "na", "removed", "redacted",
    "deidentified", "de-identified", "withheld", "not available", "patient", "blank", "empty",
})
PLACEHOLDER_PREFIX = "anon"
MIN_IDENTIFYING_CHARACTERS = 4  # letters and digits; fewer identify nobody
MIN_IDENTIFYING_DIGITS = 6  # an ID of digits only, shorter than this, is a counter, not a person
_PROFILE_VALUES = frozenset({"yes", "no", "removed", "modified", DEIDENTIFICATION_METHOD.lower()})


def _is_pseudonym(value: str) -> bool:
    """A patient key this pipeline writes (20 hex digits): an object landed before."""
    return len(value) == 20 and all(c in "0123456789abcdef" for c in value)


def _is_placeholder_date(value: str) -> bool:
    """`19000101`, `00000000` and other dates no one living was born on (year 1900 or before)."""
    digits = value.replace("-", "").replace(".", "")
    return len(digits) == 8 and digits.isdigit() and int(digits[:4]) <= 1900


def _is_placeholder_word(value: str) -> bool:
    word = " ".join(value.lower().replace("_", " ").split())
    return not word or word in PLACEHOLDER_WORDS or word.startswith(PLACEHOLDER_PREFIX)


def is_placeholder(value: str, pseudonym: str = "") -> bool:
    """True for a value that identifies no one, so finding it after cleaning is no leak: empty,
    the profile's own replacements (the pseudonym, a patient key, YES/REMOVED), a placeholder
    word in any case (`anon...`, `Anonymous`, `unknown`, `none`, `n/a`, `removed`, ... also per
    person-name component), a placeholder date (year 1900 or before), fewer than 4 letters or
    digits, one character repeated (`XXXX`, `0000`), or fewer than 6 digits alone, or a run of
    consecutive digits (`123456`)."""
    value = value.strip()
    lowered = value.lower()
    if not value or value == pseudonym or lowered in _PROFILE_VALUES or _is_pseudonym(lowered):
        return True
    components = [part for part in value.replace("=", "^").split("^") if part.strip()]
    if all(_is_placeholder_word(part) for part in components):
        return True
    if _is_placeholder_date(value):
        return True
    characters = [c for c in lowered if c.isalnum()]
    if len(characters) < MIN_IDENTIFYING_CHARACTERS or len(set(characters)) == 1:
        return True
    text = "".join(characters)
    if text.isdigit():
        steps = {int(b) - int(a) for a, b in itertools.pairwise(text)}
        return len(text) < MIN_IDENTIFYING_DIGITS or steps in ({1}, {-1})
    return False


def _identifying_values(ds, pseudonym: str = "") -> list[bytes]:
    """The patient's name, ID and birth date as they may appear in the encoded bytes, leaving
    out placeholders (`is_placeholder`)."""
    values = []
    for keyword in _CHECKED_IDENTIFIERS:
        value = str(ds.get(keyword, "") or "").strip()
        if not is_placeholder(value, pseudonym):
            values.append(value.encode("utf-8", "ignore"))
    return values


def _header_bytes(ds) -> bytes:
    """The encoded data set without its pixel data: what a leaked identifier could be in."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    header = Dataset()
    for element in ds:
        if element.tag not in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            header.add(element)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, header)
    return out.getvalue()


def deidentify_dicom(data: bytes, pseudonym: str) -> bytes:
    """DICOM bytes with the basic-profile PHI removed and the patient renamed to `pseudonym`.

    Bytes that are not DICOM come back unchanged. A cut-off header keeps only the elements pydicom
    could parse (all cleaned); a header pydicom cannot parse at all, or an output that still holds
    the original name, ID or birth date, raises `UnreadableImage`.
    """
    if not is_dicom(data):
        return data
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        identifying = _identifying_values(ds, pseudonym)
        mosaic_slices = mosaic_count(ds) if is_mosaic(ds) else None
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, struct.error) as exc:
        raise UnreadableImage(f"unreadable DICOM header, cannot de-identify: {exc}") from exc
    ds.remove_private_tags()
    if mosaic_slices is not None:
        ds.private_block(0x0019, SIEMENS_MR_HEADER, create=True).add_new(0x0A, "US", mosaic_slices)
    _clean_dataset(ds, pseudonym)
    for keyword in REPLACED_KEYWORDS:
        setattr(ds, keyword, pseudonym)
    _mark_deidentified(ds)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "MediaStorageSOPInstanceUID" in file_meta:
        file_meta.MediaStorageSOPInstanceUID = _remap_uid_value(
            file_meta.MediaStorageSOPInstanceUID
        )
    out = io.BytesIO()
    has_syntax = file_meta is not None and "TransferSyntaxUID" in file_meta
    try:
        if has_syntax:
            ds.save_as(out, enforce_file_format=True)
        else:  # legacy data set without file meta: written back as it came, without one
            implicit, little = getattr(ds, "original_encoding", (True, True))
            ds.save_as(out, implicit_vr=implicit is not False, little_endian=little is not False,
                       enforce_file_format=False)
    except (ValueError, TypeError, AttributeError, OverflowError, struct.error) as exc:
        raise UnreadableImage(f"DICOM header cannot be written back, cannot de-identify: {exc}") from exc
    cleaned = out.getvalue()
    try:
        header = _header_bytes(ds) if identifying else b""
    except (ValueError, TypeError, AttributeError, OverflowError, struct.error):
        header = cleaned
    left = [value for value in identifying if value in header and value != pseudonym.encode()]
    if left:
        raise UnreadableImage(
            f"de-identification left {len(left)} patient identifier(s) in the object (copied "
            "into elements the basic profile does not list): cannot de-identify"
        )
    return cleaned


_NIFTI_TEXT_FIELDS = {348: ("db_name", "descrip", "aux_file", "intent_name"),
                      540: ("descrip", "aux_file", "intent_name")}


def deidentify_nifti(data: bytes) -> bytes:
    """NIfTI bytes with the free-text header fields (`descrip`, `aux_file`, `intent_name`,
    `db_name`) and every header extension (a converter may put the whole DICOM header there)
    blanked in place: zero bytes of the same length, so the voxel data and its offset are
    untouched. Bytes with nothing to blank come back unchanged (the same object), so do bytes
    that are not a readable NIfTI header; a gzip-wrapped file is unwrapped and wrapped again."""
    import gzip
    import zlib

    import nibabel as nib

    wrapped = data.startswith(b"\x1f\x8b")
    try:
        raw = gzip.decompress(data) if wrapped else data
    except (OSError, EOFError, zlib.error):
        return data
    size = next((n for n in (348, 540) for order in "<>"
                 if len(raw) >= 4 and struct.unpack(order + "i", raw[:4])[0] == n), None)
    if size is None or len(raw) < size:
        return data
    header_class = nib.Nifti1Header if size == 348 else nib.Nifti2Header
    try:
        header = header_class.from_fileobj(io.BytesIO(raw[:size] + b"\0" * 4), check=False)
        vox_offset = int(header["vox_offset"])
    except (ValueError, TypeError, struct.error, nib.spatialimages.HeaderDataError):
        return data
    cleaned = bytearray(raw)
    for name in _NIFTI_TEXT_FIELDS[size]:
        offset = header_class.template_dtype.fields[name][1]
        length = header_class.template_dtype.fields[name][0].itemsize
        cleaned[offset : offset + length] = bytes(length)
    if len(raw) >= size + 4 and raw[size] != 0:  # extensions follow, up to the voxel data
        end = min(len(raw), vox_offset if vox_offset > size else len(raw))
        cleaned[size:end] = bytes(end - size)
    if cleaned == raw:
        return data
    return gzip.compress(bytes(cleaned), compresslevel=6, mtime=0) if wrapped else bytes(cleaned)


WITHHELD_MAGIC = b"MRI-ASSETS-WITHHELD/1\n"


def withheld_record(data: bytes, reason: str) -> bytes:
    """What the store keeps in place of an object that cannot be de-identified: its sha256, size
    and the reason, never its bytes. Deterministic, so re-landing the same object skips it."""
    record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "reason": reason}
    return WITHHELD_MAGIC + json.dumps(record, sort_keys=True).encode()


def read_withheld(data: bytes) -> dict | None:
    """The record of a withheld object (`sha256`, `size`, `reason`), or None for any other bytes."""
    if not data.startswith(WITHHELD_MAGIC):
        return None
    try:
        record = json.loads(data[len(WITHHELD_MAGIC):])
    except ValueError:
        return None
    if not isinstance(record, dict) or not {"sha256", "size", "reason"} <= record.keys():
        return None
    return record
