"""De-identification of the free text in research volume headers: Analyze 7.5, MINC 1 and 2,
Philips PAR and AFNI HEAD (NIfTI's is `deid.deidentify_nifti`, DICOM's `deid.deidentify_dicom`).

Each function blanks what a reader does not need and a scanner or converter may fill with the
patient's name, ID, birth date, the examination's name or date, or a path holding any of them;
what the volume's geometry and voxels are read with is left as it was. Each returns its input
unchanged (the same object) when there was nothing to blank, so the landing can tell.
"""

from __future__ import annotations

import re
import struct

from mri_assets.core.unreadable import UnreadableImage
from mri_assets.core.volume_formats import HDF5_SIGNATURE, open_hdf5

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


# ---- MINC 2 (HDF5) ----------------------------------------------------------------------------

# what a MINC 2 reader needs: the dimension variables and the image groups; everything else
# (the info group with patient, study, acquisition and dicom_... records, any other group) is
# left out of the rebuilt file
MINC2_ROOT = "minc-2.0"
MINC2_KEPT_GROUPS = ("dimensions", "image")
MINC2_KEPT_TEXT = MINC_KEPT_TEXT | {"minc_version"}
_SHORTEST_CHECKED = 4


def deidentify_minc(data: bytes) -> bytes:
    """MINC 1 (netCDF) or MINC 2 (HDF5) by its signature."""
    return deidentify_minc2(data) if data.startswith(HDF5_SIGNATURE) else deidentify_minc1(data)


def _minc2_text(value) -> bytes | None:
    """The bytes of a text attribute value (fixed or variable length, scalar or array), else None."""
    import numpy as np

    if isinstance(value, bytes | str):
        return value.encode() if isinstance(value, str) else value
    array = np.asarray(value)
    if array.dtype.kind in "SU" or (array.dtype.kind == "O" and array.size and
                                    all(isinstance(v, bytes | str) for v in array.flat)):
        return b"\n".join(v.encode() if isinstance(v, str) else bytes(v) for v in array.flat)
    return None


def _kept_attributes(obj) -> tuple[list[tuple[str, object, object]], list[bytes]]:
    """(name, value, stored dtype) of the attributes kept on `obj`, and the text values dropped:
    numbers are kept, text only where the reader needs it (`MINC2_KEPT_TEXT`)."""
    import numpy as np

    kept, dropped = [], []
    for name in obj.attrs:
        value = obj.attrs[name]
        dtype = obj.attrs.get_id(name).dtype
        text = _minc2_text(value)
        number = text is None and np.asarray(value).dtype.kind in "biuf"
        if number or (text is not None and name in MINC2_KEPT_TEXT):
            kept.append((name, value, dtype))
        else:
            dropped.append(text if text is not None else repr(value).encode())
    return kept, dropped


def deidentify_minc2(data: bytes) -> bytes:
    """A MINC 2 file rebuilt with only what its volume is read with: the `dimensions` and `image`
    groups, their datasets written again as stored (type, chunks and compression kept, the
    voxels untouched), numeric attributes and the reader's text attributes (`MINC2_KEPT_TEXT`).
    The `info` group (patient, study, acquisition, dicom_...), `history`, `ident`, `comments`
    and every other group or text attribute are left out. The file is written anew rather than
    edited, because HDF5 leaves the old bytes of a deleted or rewritten attribute in the file.
    The same input gives the same bytes; unchanged (the same object) when there is nothing to
    leave out."""
    with open_hdf5(data, "MINC 2 volume") as source:
        try:
            plan, dropped = _minc2_plan(source)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise UnreadableImage(f"MINC 2 header cannot be walked ({type(exc).__name__}: {exc}), "
                                  "so it cannot be checked for patient data") from exc
        if not dropped:
            return data
        cleaned = _write_minc2(source, plan)
    kept_text = {text for _, attributes in plan for _, value, _ in attributes
                 if (text := _minc2_text(value)) is not None}
    left = [value for value in dropped
            if len(value) >= _SHORTEST_CHECKED and value not in kept_text and value in cleaned]
    if left:
        raise UnreadableImage(f"de-identification left {len(left)} MINC 2 header value(s) in the "
                              "rebuilt file: cannot de-identify; convert it to NIfTI (mnc2nii)")
    return cleaned


def _minc2_plan(source) -> tuple[list[tuple[str, list]], list[bytes]]:
    """The objects to keep (path, kept attributes; groups end in "/") and the text left out."""
    import h5py

    root = source[MINC2_ROOT]
    plan: list[tuple[str, list]] = []
    dropped: list[bytes] = []
    for obj in (source, root):
        attributes, left_out = _kept_attributes(obj)
        plan.append((obj.name.rstrip("/") + "/", attributes))
        dropped += left_out

    def visit(name: str, obj) -> None:
        attributes, left_out = _kept_attributes(obj)
        dropped.extend(left_out)
        if isinstance(obj, h5py.Dataset):
            if obj.external or obj.is_virtual:
                raise ValueError(f"{obj.name} keeps its data in another file")
            plan.append((obj.name, attributes))
        else:
            plan.append((obj.name + "/", attributes))

    for name in root:
        link = root.get(name, getlink=True)
        if name in MINC2_KEPT_GROUPS and isinstance(link, h5py.HardLink):
            group = root[name]
            visit(name, group)
            group.visititems(visit)
        else:
            dropped.append(name.encode())
    for name in source:
        if name != MINC2_ROOT:
            dropped.append(name.encode())
    return plan, dropped


def _write_minc2(source, plan: list[tuple[str, list]]) -> bytes:
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as out:
        for path, attributes in plan:
            if path.endswith("/"):
                target = out.require_group(path.rstrip("/")) if path != "/" else out
            else:
                target = _rewritten_dataset(out, source[path])
            for name, value, dtype in attributes:
                target.attrs.create(name, value, dtype=dtype)
    return buffer.getvalue()


def _rewritten_dataset(out, dataset):
    """`dataset` written anew into `out` with its type, chunks and filters: written, not copied
    (HDF5's object copy stamps each object with the time of the copy, so landing the same file
    again would give other bytes)."""
    try:
        return out.create_dataset(
            dataset.name, data=dataset[()], dtype=dataset.dtype, chunks=dataset.chunks,
            compression=dataset.compression, compression_opts=dataset.compression_opts,
            shuffle=dataset.shuffle, fletcher32=dataset.fletcher32,
            scaleoffset=dataset.scaleoffset, fillvalue=dataset.fillvalue, track_times=False)
    except Exception as exc:
        raise UnreadableImage(f"MINC 2 dataset {dataset.name} cannot be written anew "
                              f"({type(exc).__name__}: {exc}), so its header cannot be cleaned; "
                              "convert it to NIfTI (mnc2nii)") from exc


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
