"""Why a file is not in the dataset: the reason codes, their meaning, and rejects' rows.

Every stage that turns an input away names one of `Reason`'s codes and a message with the
numbers; the codes are stable (users filter rejects.parquet by them) and docs/format.md lists
them with `DESCRIPTIONS` (tests/test_format.py keeps the two equal). The table's schema is the
format's (pipeline/format.py, where `reason` is a string); the codes stay here, beside the
checks that name them and the summary that describes them, so a new check changes one module.
"""

from __future__ import annotations

from enum import Enum

import pyarrow as pa

from pipeline.format import REJECTS_SCHEMA


class Reason(str, Enum):
    """A rejection's stable code, in the order the job checks them."""

    BAD_NAME = "bad_name"
    BAD_PATH = "bad_path"
    NO_PATH = "no_path"
    UNREADABLE = "unreadable"
    OUTSIDE_ROOT = "outside_root"
    NOT_A_FILE = "not_a_file"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    ORPHAN_CAPTION = "orphan_caption"
    CORRUPT = "corrupt"
    TOO_MANY_PIXELS = "too_many_pixels"
    FILE_TOO_LARGE = "file_too_large"
    DUPLICATE = "duplicate"
    DUPLICATE_CONTENT = "duplicate_content"
    ASPECT = "aspect"
    TOO_SMALL = "too_small"
    UPSCALE = "upscale"
    CROP = "crop"
    NEAR_DUPLICATE = "near_duplicate"
    CAPTION_ENCODING = "caption_encoding"
    BAD_CAPTION = "bad_caption"
    CHANGED = "changed"


DESCRIPTIONS = {
    Reason.BAD_NAME: "has a name that is not valid UTF-8 (shown with the odd bytes escaped, "
    "`\\xe9`): rename it, e.g. `convmv -f latin1 -t utf8`",
    Reason.BAD_PATH: "is a listing row whose path cannot name a file: an embedded NUL, or a URL "
    "scheme pyarrow does not read (http: download first, e.g. with img2dataset)",
    Reason.NO_PATH: "is a listing row with an empty path",
    Reason.UNREADABLE: "could not be read: missing, dangling or looping symlink, vanished, "
    "I/O error",
    Reason.OUTSIDE_ROOT: "is a symlink to a file outside the input folder",
    Reason.NOT_A_FILE: "is a directory, FIFO, socket or device",
    Reason.NOT_AN_IMAGE: "is empty or not an image, whatever its name says",
    Reason.UNSUPPORTED_FORMAT: "has an extension or a format (PSD, ICO, PPM...) outside jpg, "
    "png, webp, bmp, gif, tiff",
    Reason.ORPHAN_CAPTION: "is a `.txt`/`.caption`/`.json` file with no image of the same name",
    Reason.CORRUPT: "is an image whose header or pixels cannot be decoded (truncated, damaged)",
    Reason.TOO_MANY_PIXELS: "has more pixels than `--max-pixels` (a decompression-bomb guard), "
    "refused before decoding",
    Reason.FILE_TOO_LARGE: "is far larger than its pixels can need (16 bytes a pixel plus "
    "64 MiB): junk after the image, or a sparse file; never read",
    Reason.DUPLICATE: "is listed again (a listing file naming one path twice): the first is kept",
    Reason.DUPLICATE_CONTENT: "has the same bytes as another file (a hash of each file, taken "
    "in the scan): the first by path is kept, or the one OUT holds; `--no-dedup` keeps all",
    Reason.ASPECT: "has an aspect ratio beyond `--max-log-aspect-error` of every bucket",
    Reason.TOO_SMALL: "(`--no-upscale`) has a side under `--min-side`",
    Reason.UPSCALE: "would have to be enlarged more than `--max-upscale` (default 2x)",
    Reason.CROP: "would lose more than `--max-crop` of its area to the fit's crop (default 0.5)",
    Reason.NEAR_DUPLICATE: "(`--near-dedup`) looks like another image: their perceptual hashes "
    "(dHash) differ by at most `--near-dedup-distance` bits; the one with the most pixels, "
    "then bytes, then the first by path is kept, or the one OUT holds",
    Reason.CAPTION_ENCODING: "has a caption file that is not UTF-8",
    Reason.BAD_CAPTION: "has a JSON caption that cannot be read: a `.json` sidecar that is not "
    "a JSON object, or a `metadata.jsonl` with lines that are not",
    Reason.CHANGED: "changed between the scan and the write (another size or orientation): "
    "rerun to take the new file",
}


# Rejections of a copy of a kept image (their messages by copy_message): report.html groups them
# by the copy they name.
COPY_REASONS = tuple(
    reason.value for reason in (Reason.DUPLICATE, Reason.DUPLICATE_CONTENT, Reason.NEAR_DUPLICATE)
)
_KEPT = ", which is kept"


def copy_message(likeness: str, kept: str) -> str:
    """The message of a copy's rejection, naming the source kept: "{likeness} as {kept}, which
    is kept" (`likeness`: "the same bytes"); `kept_copy` reads it back."""
    return f"{likeness} as {kept}{_KEPT}"


def kept_copy(source: str, reason: str, message: str | None) -> str | None:
    """The source a COPY_REASONS rejection names as kept (a path listed twice: itself); None
    for other reasons, or a message without one."""
    if reason == Reason.DUPLICATE.value:
        return source
    if reason not in COPY_REASONS or not (message or "").endswith(_KEPT):
        return None
    _, found, kept = message[: -len(_KEPT)].partition(" as ")
    return kept if found and kept else None


def reject(reason: Reason, message: str) -> dict:
    """The columns that mark a listing or scan row as rejected."""
    return {"reject": reason.value, "message": message}


class Rejected(Exception):
    """Raised inside a work unit for one bad file; caught there and recorded, never crossing
    a process boundary."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def rejects_table(rows: pa.Table, reasons, messages) -> pa.Table:
    """REJECTS_SCHEMA rows for `rows` (any table with source, key, size and mtime_ns)."""
    return pa.table(
        {
            "source": rows["source"],
            "reason": pa.array(reasons, pa.string()),
            "message": pa.array(messages, pa.string()),
            "key": rows["key"],
            "size": rows["size"],
            "mtime_ns": rows["mtime_ns"],
        },
        schema=REJECTS_SCHEMA,
    )
