"""De-identification of the free text in research volume headers: Analyze 7.5, MINC 1, Philips
PAR and AFNI HEAD (NIfTI's is `deid.deidentify_nifti`, DICOM's `deid.deidentify_dicom`).

Each function blanks what a reader does not need and a scanner or converter may fill with the
patient's name, ID, birth date, the examination's name or date, or a path holding any of them;
what the volume's geometry and voxels are read with is left as it was. Each returns its input
unchanged (the same object) when there was nothing to blank, so the landing can tell.
"""

from __future__ import annotations

import re
import struct

from mri_assets.core.unreadable import UnreadableImage

# ---- Analyze 7.5 ------------------------------------------------------------------------------

# (offset, length) of the text fields of the 348-byte Analyze 7.5 header (dsr): data_type,
# db_name, descrip, aux_file, generated, scannum, patient_id, exp_date, exp_time, hist_un0
ANALYZE_TEXT_FIELDS = ((4, 10), (14, 18), (148, 80), (228, 24), (263, 10), (273, 10), (283, 10),
                       (293, 10), (303, 10), (313, 3))


def deidentify_analyze_header(header: bytes) -> bytes:
    """An Analyze 7.5 `.hdr` with its text fields zeroed (geometry and scaling untouched)."""
    if len(header) < 348 or 348 not in (struct.unpack("<i", header[:4])[0],
                                        struct.unpack(">i", header[:4])[0]):
        raise UnreadableImage("Analyze header is not 348 bytes long as Analyze 7.5 says: it cannot "
                              "be checked for patient data; export the volume again")
    cleaned = bytearray(header)
    for offset, length in ANALYZE_TEXT_FIELDS:
        cleaned[offset : offset + length] = bytes(length)
    return header if cleaned == header else bytes(cleaned)


# ---- MINC 1 (netCDF classic) ------------------------------------------------------------------

_NC_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8}
_NC_CHAR = 2
# variables that hold the volume and its axes; every other variable (patient, study,
# acquisition, dicom_0x...) is header information and all its attribute values are zeroed
MINC_VOLUME_VARIABLES = frozenset({"image", "image-max", "image-min", "xspace", "yspace",
                                   "zspace", "time", "vector_dimension", "rootvariable"})
# text attributes of those variables that the reader needs
MINC_KEPT_TEXT = frozenset({"signtype", "spacing", "alignment", "units", "spacetype", "dimorder",
                            "vartype", "version", "varid", "complete", "parent", "children"})


def _nc_name(data: bytes, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(">i", data, pos)
    pos += 4
    name = data[pos : pos + length].decode("utf-8", "replace")
    return name, pos + (length + 3) // 4 * 4


def _nc_attributes(data: bytes, pos: int, owner: str | None, found: list) -> int:
    tag, count = struct.unpack_from(">ii", data, pos)
    pos += 8
    if tag not in (0, 0x0C):
        raise ValueError(f"attribute list tag {tag:#x}")
    for _ in range(count):
        name, pos = _nc_name(data, pos)
        nc_type, n = struct.unpack_from(">ii", data, pos)
        pos += 8
        size = _NC_SIZES.get(nc_type)
        if size is None or n < 0:
            raise ValueError(f"attribute {name} of type {nc_type}")
        length = n * size
        found.append((owner, name, nc_type, pos, length))
        pos += (length + 3) // 4 * 4
    return pos


def minc1_attributes(data: bytes) -> list[tuple[str | None, str, int, int, int]]:
    """(variable or None for global, attribute, netCDF type, value offset, value length) of
    every attribute in a netCDF classic (MINC 1) header."""
    if data[:4] not in (b"CDF\x01", b"CDF\x02"):
        raise ValueError("not a netCDF classic file")
    offset_bytes = 4 if data[3] == 1 else 8
    pos = 8
    tag, count = struct.unpack_from(">ii", data, pos)
    pos += 8
    for _ in range(count if tag == 0x0A else 0):
        _, pos = _nc_name(data, pos)
        pos += 4
    found: list = []
    pos = _nc_attributes(data, pos, None, found)
    tag, count = struct.unpack_from(">ii", data, pos)
    pos += 8
    for _ in range(count if tag == 0x0B else 0):
        name, pos = _nc_name(data, pos)
        (ndims,) = struct.unpack_from(">i", data, pos)
        pos += 4 + 4 * ndims
        pos = _nc_attributes(data, pos, name, found)
        pos += 8 + offset_bytes  # nc_type, vsize, begin
    if pos > len(data):
        raise ValueError("header runs past the end of the file")
    return found


def deidentify_minc1(data: bytes) -> bytes:
    """A MINC 1 file with every attribute of its header variables (patient, study, acquisition,
    dicom_...) zeroed, and every text attribute the reader does not need (history, ident, ...)
    zeroed too, in place: the same length, the voxels untouched."""
    try:
        attributes = minc1_attributes(data)
    except (ValueError, struct.error) as exc:
        raise UnreadableImage(f"MINC 1 header cannot be walked ({exc}), so it cannot be checked "
                              "for patient data") from exc
    cleaned = bytearray(data)
    for owner, name, nc_type, offset, length in attributes:
        header_variable = owner is not None and owner not in MINC_VOLUME_VARIABLES
        free_text = nc_type == _NC_CHAR and name not in MINC_KEPT_TEXT
        if header_variable or free_text:
            cleaned[offset : offset + length] = bytes(length)
    return data if cleaned == data else bytes(cleaned)


# ---- Philips PAR ------------------------------------------------------------------------------

PAR_TEXT_FIELDS = ("Patient name", "Examination name", "Protocol name", "Examination date/time")
_PAR_LINE = re.compile(
    rb"^(\.\s*(?:" + b"|".join(re.escape(f.encode()) for f in PAR_TEXT_FIELDS) + rb")\s*:)[^\r\n]*",
    re.MULTILINE)
_PAR_DATASET_LINE = re.compile(rb"^(#\s*Dataset name:)[^\r\n]*", re.MULTILINE)


def deidentify_par(header: bytes) -> bytes:
    """A PAR header with the patient's name, the examination's name and date, the protocol name
    and the dataset's path (a comment) blanked; the image information lines are untouched."""
    cleaned = _PAR_DATASET_LINE.sub(rb"\1", _PAR_LINE.sub(rb"\1   ", header))
    return header if cleaned == header else cleaned


# ---- AFNI HEAD --------------------------------------------------------------------------------

# string attributes the reader needs; every other string attribute (HISTORY_NOTE,
# DATASET_NAME, LABEL_1/2, IDCODE_*, BRICK_LABS, NOTE_*, ...) is emptied
AFNI_KEPT_STRINGS = frozenset({"TYPESTRING", "BYTEORDER_STRING", "TEMPLATE_SPACE"})
_AFNI_STRING = re.compile(
    rb"(type\s*=\s*string-attribute\s*\n\s*name\s*=\s*(\S+)\s*\n\s*count\s*=\s*)(\d+)(\s*\n)'[^~]*~")


def deidentify_afni_head(header: bytes) -> bytes:
    """An AFNI `.HEAD` whose free-text string attributes are empty (`'~`)."""

    def blank(match: re.Match) -> bytes:
        if match.group(2).decode("latin-1") in AFNI_KEPT_STRINGS:
            return match.group(0)
        return match.group(1) + b"1" + match.group(4) + b"'~"

    cleaned = _AFNI_STRING.sub(blank, header)
    return header if cleaned == header else cleaned
