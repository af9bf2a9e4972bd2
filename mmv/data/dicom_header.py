"""A bounded, pure-Python parse of the DICOM header fields that decide whether a file is safe to decode.

GDCM, ITK's DICOM library, aborts the whole process with an uncaught C++ exception on some inconsistent
headers (PALETTE COLOR without a palette, even while only probing the file), reads unparsable decimal
strings such as ``"nan"`` or ``"abc"`` as whatever memory held, and pads short pixel data with
uninitialised memory. :func:`read_dicom_header` therefore parses every DICOM file first, in Python, where
a corrupt file can only raise :class:`DicomHeaderError`, so that the reader hands GDCM only files whose
header is consistent.

Only the elements in ``_KEPT`` (image geometry, pixel format, modality, series UID) are copied out of the
file; every other value, patient identifiers included, is skipped by its length and never decoded. Every
loop advances through a buffer of fixed size and nesting is bounded, so parsing ends on any input.
"""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DicomHeader", "DicomHeaderError", "read_dicom_header", "looks_like_dicom"]


class DicomHeaderError(Exception):
    """The file is not a well-formed DICOM file; the message says why."""


def _tag(group: int, element: int) -> int:
    return group << 16 | element


TRANSFER_SYNTAX = _tag(0x0002, 0x0010)
MODALITY = _tag(0x0008, 0x0060)
SLICE_THICKNESS = _tag(0x0018, 0x0050)
SPACING_BETWEEN_SLICES = _tag(0x0018, 0x0088)
IMAGER_PIXEL_SPACING = _tag(0x0018, 0x1164)
SERIES_INSTANCE_UID = _tag(0x0020, 0x000E)
IMAGE_POSITION = _tag(0x0020, 0x0032)
IMAGE_ORIENTATION = _tag(0x0020, 0x0037)
SAMPLES_PER_PIXEL = _tag(0x0028, 0x0002)
PHOTOMETRIC = _tag(0x0028, 0x0004)
NUMBER_OF_FRAMES = _tag(0x0028, 0x0008)
ROWS = _tag(0x0028, 0x0010)
COLUMNS = _tag(0x0028, 0x0011)
PIXEL_SPACING = _tag(0x0028, 0x0030)
BITS_ALLOCATED = _tag(0x0028, 0x0100)
BITS_STORED = _tag(0x0028, 0x0101)
HIGH_BIT = _tag(0x0028, 0x0102)
PIXEL_REPRESENTATION = _tag(0x0028, 0x0103)
RESCALE_INTERCEPT = _tag(0x0028, 0x1052)
RESCALE_SLOPE = _tag(0x0028, 0x1053)
PIXEL_MEASURES_SEQUENCE = _tag(0x0028, 0x9110)
SHARED_FUNCTIONAL_GROUPS = _tag(0x5200, 0x9229)
PER_FRAME_FUNCTIONAL_GROUPS = _tag(0x5200, 0x9230)
FLOAT_PIXEL_DATA = _tag(0x7FE0, 0x0008)
DOUBLE_PIXEL_DATA = _tag(0x7FE0, 0x0009)
PIXEL_DATA = _tag(0x7FE0, 0x0010)
_ITEM = _tag(0xFFFE, 0xE000)
_ITEM_END = _tag(0xFFFE, 0xE00D)
_SEQUENCE_END = _tag(0xFFFE, 0xE0DD)

_US = {SAMPLES_PER_PIXEL, ROWS, COLUMNS, BITS_ALLOCATED, BITS_STORED, HIGH_BIT, PIXEL_REPRESENTATION}
_KEPT = _US | {
    TRANSFER_SYNTAX,
    MODALITY,
    SLICE_THICKNESS,
    SPACING_BETWEEN_SLICES,
    IMAGER_PIXEL_SPACING,
    SERIES_INSTANCE_UID,
    IMAGE_POSITION,
    IMAGE_ORIENTATION,
    PHOTOMETRIC,
    NUMBER_OF_FRAMES,
    PIXEL_SPACING,
    RESCALE_INTERCEPT,
    RESCALE_SLOPE,
}
# DICOM keywords of the kept elements, for messages.
_NAMES = {
    TRANSFER_SYNTAX: "TransferSyntaxUID",
    MODALITY: "Modality",
    SLICE_THICKNESS: "SliceThickness",
    SPACING_BETWEEN_SLICES: "SpacingBetweenSlices",
    IMAGER_PIXEL_SPACING: "ImagerPixelSpacing",
    SERIES_INSTANCE_UID: "SeriesInstanceUID",
    IMAGE_POSITION: "ImagePositionPatient",
    IMAGE_ORIENTATION: "ImageOrientationPatient",
    SAMPLES_PER_PIXEL: "SamplesPerPixel",
    PHOTOMETRIC: "PhotometricInterpretation",
    NUMBER_OF_FRAMES: "NumberOfFrames",
    ROWS: "Rows",
    COLUMNS: "Columns",
    PIXEL_SPACING: "PixelSpacing",
    BITS_ALLOCATED: "BitsAllocated",
    BITS_STORED: "BitsStored",
    HIGH_BIT: "HighBit",
    PIXEL_REPRESENTATION: "PixelRepresentation",
    RESCALE_INTERCEPT: "RescaleIntercept",
    RESCALE_SLOPE: "RescaleSlope",
    PIXEL_MEASURES_SEQUENCE: "PixelMeasuresSequence",
    SHARED_FUNCTIONAL_GROUPS: "SharedFunctionalGroupsSequence",
    PER_FRAME_FUNCTIONAL_GROUPS: "PerFrameFunctionalGroupsSequence",
    PIXEL_DATA: "PixelData",
}
# Sequences descended into: the enhanced multi-frame IODs keep pixel spacing in functional groups.
_KEPT_SEQUENCES = {SHARED_FUNCTIONAL_GROUPS, PER_FRAME_FUNCTIONAL_GROUPS, PIXEL_MEASURES_SEQUENCE}
# The kept elements are short strings and numbers; a longer value is a corrupt length.
_MAX_KEPT_LENGTH = 1024
_MAX_DEPTH = 12
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit-VR value representations with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VR_PATTERN = re.compile(rb"[A-Z]{2}")
# PS3.5 6.2: a decimal string, optionally padded with spaces. Python's float() alone would also take
# "nan", "inf" and "1_0".
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
DEFLATED_LITTLE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
NATIVE_TRANSFER_SYNTAXES = {IMPLICIT_LITTLE, EXPLICIT_LITTLE, DEFLATED_LITTLE, EXPLICIT_BIG}
# Compressed transfer syntaxes GDCM decodes: JPEG baseline, extended, lossless; JPEG-LS; JPEG 2000; RLE.
ENCAPSULATED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
}
# A deflated data set is inflated here to check it; more than this is not a header worth reading.
_MAX_INFLATED_BYTES = 1 << 30


@dataclass(frozen=True)
class DicomHeader:
    """The raw values of the kept elements and where the pixel data lies.

    Attributes:
        transfer_syntax: the TransferSyntaxUID (implicit VR little endian when the file has no meta header).
        elements: raw value bytes of the kept top-level elements; nested datasets for the kept sequences.
        pixel_data_length: bytes of native pixel data, or None when encapsulated (compressed) or absent.
        has_pixel_data: whether the file has a Pixel Data element (7FE0,0010).
        has_float_pixel_data: whether it has Float or Double Float Pixel Data instead.
        big_endian: whether binary values are big endian.
    """

    transfer_syntax: str
    elements: dict
    pixel_data_length: int | None
    has_pixel_data: bool
    has_float_pixel_data: bool
    big_endian: bool

    def text(self, tag: int, dataset: dict | None = None) -> str | None:
        """A string element without its padding, or None when absent or empty."""
        raw = (self.elements if dataset is None else dataset).get(tag)
        if not isinstance(raw, bytes):
            return None
        value = raw.decode("ascii", errors="replace").strip(" \x00")
        return value or None

    def unsigned(self, tag: int) -> int | None:
        """A US element (one 16-bit unsigned value), or None when absent."""
        raw = self.elements.get(tag)
        if raw is None:
            return None
        if not isinstance(raw, bytes) or len(raw) != 2:
            raise DicomHeaderError(f"element {_tag_text(tag)} is not one 16-bit unsigned value")
        return struct.unpack(">H" if self.big_endian else "<H", raw)[0]

    def integer(self, tag: int) -> int | None:
        """An IS element (integer string), or None when absent or empty."""
        text = self.text(tag)
        if text is None:
            return None
        if not _INTEGER.fullmatch(text):
            raise DicomHeaderError(f"element {_tag_text(tag)} is not an integer string: {text[:32]!r}")
        return int(text)

    def decimals(self, tag: int, dataset: dict | None = None) -> tuple[float, ...] | None:
        """A DS element's finite values, or None when absent or empty.

        Raises:
            DicomHeaderError: when a value is not a decimal string or not finite.
        """
        text = self.text(tag, dataset)
        if text is None:
            return None
        values = []
        for part in text.split("\\"):
            part = part.strip(" \x00")
            if not _DECIMAL.fullmatch(part):
                raise DicomHeaderError(f"element {_tag_text(tag)} is not a decimal string: {text[:32]!r}")
            value = float(part)
            if value in (float("inf"), float("-inf")):
                raise DicomHeaderError(f"element {_tag_text(tag)} overflows: {text[:32]!r}")
            values.append(value)
        return tuple(values)

    def items(self, tag: int, dataset: dict | None = None) -> list[dict]:
        """The item datasets of a kept sequence (empty when absent)."""
        value = (self.elements if dataset is None else dataset).get(tag)
        return value if isinstance(value, list) else []


def _tag_text(tag: int) -> str:
    """A tag as ``Keyword (gggg,eeee)``, or ``(gggg,eeee)`` for elements not kept."""
    numbers = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{_NAMES[tag]} {numbers}" if tag in _NAMES else numbers


def looks_like_dicom(prefix: bytes) -> bool:
    """Whether a file's first 132 bytes start a DICOM file: the DICM marker, or a bare little-endian data set
    whose first element is in the file-meta (0002) or identifying (0008) group."""
    if prefix[128:132] == b"DICM":
        return True
    return len(prefix) >= 8 and struct.unpack("<H", prefix[:2])[0] in (0x0002, 0x0008)


def read_dicom_header(path: Path) -> DicomHeader:
    """Parse a DICOM file's header up to its pixel data and check the pixel data's framing.

    Raises:
        DicomHeaderError: for anything that is not a well-formed DICOM file: bad element framing, a length
            past the end of the file, nesting beyond a bound, an unknown transfer syntax, short native
            pixel data (against the length its element declares), or broken encapsulated fragments.
        OSError: when the file cannot be opened or mapped.
    """
    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        # The error is turned into text here so that no traceback keeps views of the map open when it closes.
        try:
            return _parse_file(memoryview(mapped))
        except DicomHeaderError as error:
            reason = str(error)
        except struct.error as error:  # an unpack past the end that the framing checks did not foresee
            reason = f"truncated data element: {error}"
    raise DicomHeaderError(reason)


def _parse_file(data: memoryview) -> DicomHeader:
    position = 132 if bytes(data[128:132]) == b"DICM" else 0
    meta: dict = {}
    if len(data) >= position + 2 and struct.unpack("<H", data[position : position + 2])[0] == 0x0002:
        explicit = _VR_PATTERN.fullmatch(bytes(data[position + 4 : position + 6])) is not None
        meta_parser = _Parser(data, little=True, explicit=explicit)
        meta, position = meta_parser.dataset(position, len(data), 0, stop_after_group=0x0002)
    syntax_raw = meta.get(TRANSFER_SYNTAX)
    syntax = syntax_raw.decode("ascii", errors="replace").strip(" \x00") if syntax_raw else None
    if syntax is None:
        # No meta header: the default transfer syntax, but some writers use explicit VR regardless.
        explicit = _VR_PATTERN.fullmatch(bytes(data[position + 4 : position + 6])) is not None
        syntax, little = (EXPLICIT_LITTLE if explicit else IMPLICIT_LITTLE), True
    elif syntax in NATIVE_TRANSFER_SYNTAXES or syntax in ENCAPSULATED_TRANSFER_SYNTAXES:
        explicit, little = syntax != IMPLICIT_LITTLE, syntax != EXPLICIT_BIG
    else:
        raise DicomHeaderError(f"unsupported transfer syntax {syntax[:64]!r}")
    if syntax == DEFLATED_LITTLE:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = memoryview(inflater.decompress(data[position:], _MAX_INFLATED_BYTES))
        except zlib.error as error:
            raise DicomHeaderError(f"corrupt deflated data set: {error}") from None
        position = 0
    if len(data) >= position + 6:
        # Like other readers, believe the data set's first element over the transfer syntax about explicit VR:
        # some writers encode the data set in implicit VR while declaring explicit VR little endian.
        explicit = _VR_PATTERN.fullmatch(bytes(data[position + 4 : position + 6])) is not None
    parser = _Parser(data, little=little, explicit=explicit)
    elements, _ = parser.dataset(position, len(data), 0)
    return DicomHeader(
        transfer_syntax=syntax,
        elements=elements,
        pixel_data_length=parser.pixel_data_length,
        has_pixel_data=parser.has_pixel_data,
        has_float_pixel_data=parser.has_float_pixel_data,
        big_endian=not little,
    )


class _Parser:
    """Walks data elements of one encoding, keeping the values in ``_KEPT`` and stopping at the pixel data."""

    def __init__(self, data: memoryview, little: bool, explicit: bool) -> None:
        self.data = data
        self.order = "<" if little else ">"
        self.explicit = explicit
        self.has_pixel_data = False
        self.has_float_pixel_data = False
        self.pixel_data_length: int | None = None

    def _unpack(self, kind: str, position: int) -> int:
        return struct.unpack_from(self.order + kind, self.data, position)[0]

    def _element_header(self, position: int, end: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, value start) of the element at ``position``."""
        if position + 8 > end:
            raise DicomHeaderError(f"truncated data element at byte {position}")
        tag = self._unpack("H", position) << 16 | self._unpack("H", position + 2)
        if tag >> 16 == 0xFFFE or not explicit:
            return tag, None, self._unpack("I", position + 4), position + 8
        vr = bytes(self.data[position + 4 : position + 6])
        if not _VR_PATTERN.fullmatch(vr):
            raise DicomHeaderError(f"element {_tag_text(tag)} at byte {position} has no valid value representation")
        if vr in _LONG_VRS:
            if position + 12 > end:
                raise DicomHeaderError(f"truncated data element at byte {position}")
            return tag, vr, self._unpack("I", position + 8), position + 12
        return tag, vr, self._unpack("H", position + 6), position + 8

    def dataset(
        self,
        position: int,
        end: int,
        depth: int,
        explicit: bool | None = None,
        keep: bool = True,
        stop_after_group: int | None = None,
    ) -> tuple[dict, int]:
        """Parse elements from ``position`` to ``end`` or to an item delimiter: (kept values, next position).

        ``keep`` is False inside sequences that are not kept, whose elements are only walked over.
        """
        explicit = self.explicit if explicit is None else explicit
        if depth > _MAX_DEPTH:
            raise DicomHeaderError(f"sequences nested deeper than {_MAX_DEPTH} levels")
        kept: dict = {}
        while position < end:
            if stop_after_group is not None and (
                position + 2 > end or struct.unpack_from("<H", self.data, position)[0] != stop_after_group
            ):
                break
            tag, vr, length, start = self._element_header(position, end, explicit)
            if tag == _ITEM_END:
                if depth == 0:
                    raise DicomHeaderError(f"item delimiter outside a sequence at byte {position}")
                return kept, start
            if tag in (_ITEM, _SEQUENCE_END):
                raise DicomHeaderError(f"misplaced item tag at byte {position}")
            if tag == PIXEL_DATA and depth == 0:
                self._pixel_data(start, length, end)
                return kept, end
            if tag in (FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA) and depth == 0:
                self.has_float_pixel_data = True
            if length == _UNDEFINED_LENGTH:
                if tag == PIXEL_DATA:  # an encapsulated icon inside a sequence
                    position, _ = self._fragments(start, end)
                    continue
                if vr not in (None, b"SQ", b"UN"):
                    raise DicomHeaderError(f"element {_tag_text(tag)} of VR {vr.decode()} with undefined length")
                # PS3.5 6.2.2: an UN element of undefined length holds implicit-VR items.
                items, position = self._sequence(
                    start, end, depth + 1, explicit and vr != b"UN", keep and tag in _KEPT_SEQUENCES, undefined=True
                )
                if keep and tag in _KEPT_SEQUENCES:
                    kept[tag] = items
                continue
            if length > end - start:
                raise DicomHeaderError(f"element {_tag_text(tag)} at byte {position} runs past the end of the data")
            if keep and tag in _KEPT_SEQUENCES and vr in (None, b"SQ"):
                kept[tag], _ = self._sequence(start, start + length, depth + 1, explicit, True, undefined=False)
            elif keep and tag in _KEPT:
                if length > _MAX_KEPT_LENGTH:
                    raise DicomHeaderError(f"element {_tag_text(tag)} is implausibly long ({length} bytes)")
                kept[tag] = bytes(self.data[start : start + length])
            position = start + length
        return kept, position

    def _sequence(
        self, position: int, end: int, depth: int, explicit: bool, keep: bool, undefined: bool
    ) -> tuple[list, int]:
        items = []
        while position < end:
            tag, _, length, start = self._element_header(position, end, explicit=False)
            if tag == _SEQUENCE_END:
                if not undefined:
                    raise DicomHeaderError(f"sequence delimiter in a sequence of defined length at byte {position}")
                return items, start
            if tag != _ITEM:
                raise DicomHeaderError(f"expected a sequence item at byte {position}, found {_tag_text(tag)}")
            if length == _UNDEFINED_LENGTH:
                item, position = self.dataset(start, end, depth, explicit, keep)
            else:
                if length > end - start:
                    raise DicomHeaderError(f"sequence item at byte {position} runs past the end of the data")
                item, _ = self.dataset(start, start + length, depth, explicit, keep)
                position = start + length
            items.append(item)
        if undefined:
            raise DicomHeaderError("sequence of undefined length without its delimiter")
        return items, position

    def _fragments(self, position: int, end: int) -> tuple[int, int]:
        """Walk encapsulated pixel data (offset table item, fragments, delimiter): (next position, items)."""
        items = 0
        while True:
            tag, _, length, start = self._element_header(position, end, explicit=False)
            if tag == _SEQUENCE_END:
                return start, items
            if tag != _ITEM or length == _UNDEFINED_LENGTH or length > end - start:
                raise DicomHeaderError(f"broken encapsulated pixel data fragment at byte {position}")
            items += 1
            position = start + length

    def _pixel_data(self, start: int, length: int, end: int) -> None:
        self.has_pixel_data = True
        if length == _UNDEFINED_LENGTH:
            _, items = self._fragments(start, end)
            if items < 2:
                raise DicomHeaderError("encapsulated pixel data without any fragment")
            return
        if length > end - start:
            raise DicomHeaderError(
                f"truncated pixel data: the element declares {length} bytes, the file holds {end - start}"
            )
        self.pixel_data_length = length
