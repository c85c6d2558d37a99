"""Where an input file went (`arb-inspect OUT [PATH...]`, `python -m pipeline.inspect`).

    arb-inspect OUT                       # what OUT holds: images, buckets, rejects, settings
    arb-inspect OUT photo.jpg web.tar/000000001.jpg rows.parquet/42

For each PATH (a source as the index names it: a file relative to the input folder, a tar
member TAR/MEMBER, a Parquet row FILE/ROW; or the file's absolute or ./ path), its bucket,
stored size, crop box and shard member, or why it was not kept, or that the job never saw it.
Reads index.parquet and rejects.parquet filtered by source, never the inputs. Exit status 0
when every PATH was seen, 1 when one was not, 2 when OUT is not a prepared dataset.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.fit import fit
from pipeline.format import JSON_MEMBER_FIELDS, Manifest, OutputDir
from pipeline.inputs import LISTING_EXTENSIONS, absolute, split_extension
from pipeline.output import flat_settings
from pipeline.rejects import DESCRIPTIONS

PARQUET_ROW = re.compile(r"^(?P<file>.+\.(?i:parquet))/(?P<row>[0-9]+)$")
KEPT_COLUMNS = [  # the index's columns a kept file's answer reads
    "key",
    *JSON_MEMBER_FIELDS,
    "crop_left",
    "crop_top",
    "shard",
    "image_offset",
    "image_size",
    "caption",
]
DESCRIBED = {reason.value: text for reason, text in DESCRIPTIONS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="arb-inspect",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("out", metavar="OUT", help="a prepared dataset (jobs/prepare.py --output)")
    parser.add_argument("paths", metavar="PATH", nargs="*", help="input files to look up")
    args = parser.parse_args(argv)
    try:
        out, manifest = _prepared(args.out)
    except UsageError as error:
        print(f"inspect: {error}", file=sys.stderr)
        return 2
    if not args.paths:
        print(summary(out, manifest))
        return 0
    found = look_up(out, manifest, args.paths)
    for _, lines in found.values():
        print("\n".join(lines))
    return 0 if all(seen for seen, _ in found.values()) else 1


def _prepared(uri: str) -> tuple[OutputDir, Manifest]:
    """OUT and its manifest; UsageError when OUT is no complete dataset."""
    out = OutputDir(absolute(uri))
    try:
        manifest = Manifest.read(out)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if manifest is None:
        if out.exists(out.path("config.json")):
            raise UsageError(f"{uri} is incomplete (no manifest.json): rerun the job to finish it")
        raise UsageError(f"{uri} is not a prepared dataset (no manifest.json)")
    return out, manifest


def source_forms(path: str, input_uri: str) -> list[str]:
    """The sources `path` may be recorded as: itself; without ./; made relative to the input's
    folder when it names a local file inside it; a Parquet row's number written as the index
    writes it (FILE/000000042)."""
    forms = [path]
    if "://" not in path:
        plain = posixpath.normpath(path)
        forms.append(plain)
        root = input_uri
        if "://" not in root and split_extension(root)[1] in LISTING_EXTENSIONS:
            root = posixpath.dirname(root)  # a listing or a Parquet file: sources beside it
        full = os.path.abspath(path)
        if "://" not in root and full.startswith(root.rstrip("/") + "/"):
            forms.append(posixpath.relpath(full, root))
    for form in list(forms):
        if row := PARQUET_ROW.match(form):
            forms.append(f"{row['file']}/{int(row['row']):09d}")
    return list(dict.fromkeys(forms))


def look_up(
    out: OutputDir, manifest: Manifest, paths: list[str]
) -> dict[str, tuple[bool, list[str]]]:
    """For each path, whether the job saw it and its lines: the first "PATH: kept", "PATH:
    rejected" or "PATH: never seen", the details after it."""
    forms = {path: source_forms(path, manifest.input["uri"]) for path in paths}
    wanted = sorted({form for found in forms.values() for form in found})
    filters = [("source", "in", wanted)]
    filesystem = out.filesystem
    index = pq.read_table(
        out.path("index.parquet"), columns=KEPT_COLUMNS, filters=filters, filesystem=filesystem
    )
    rejects = pq.read_table(out.path("rejects.parquet"), filters=filters, filesystem=filesystem)
    extension = manifest.settings["write"]["image_format"]
    answers = {}
    for path, candidates in forms.items():
        for form in candidates:
            kept = index.filter(pc.equal(index["source"], form)).to_pylist()
            rejected = rejects.filter(pc.equal(rejects["source"], form)).to_pylist()
            if kept or rejected:
                lines = [f"{path}: {'kept' if kept else 'rejected'}"]
                lines += [line for row in kept for line in _kept(row, form, extension)]
                lines += [line for row in rejected for line in _rejected(row, form)]
                answers[path] = (True, lines)
                break
        else:
            answers[path] = (
                False,
                [
                    f"{path}: never seen",
                    "  in neither index.parquet nor rejects.parquet, as "
                    + ", ".join(candidates)
                    + f" (sources are named relative to the input, {manifest.input['uri']})",
                ],
            )
    return answers


def _kept(row: dict, source: str, extension: str) -> list[str]:
    bucket = (row["bucket_width"], row["bucket_height"])
    stored = (row["stored_width"], row["stored_height"])
    fitted = fit(row["width"], row["height"], *bucket)
    left, top = row["crop_left"], row["crop_top"]
    box = (left, top, left + stored[0], top + stored[1])
    range_x, range_y = stored[0] - bucket[0], stored[1] - bucket[1]
    caption = row["caption"]
    return [
        f"  source {source}, {row['width']}x{row['height']}",
        f"  bucket {bucket[0]}x{bucket[1]} (#{row['bucket']}), stored {stored[0]}x{stored[1]}",
        f"  crop box {box} of the fitted {fitted[0]}x{fitted[1]}; training takes a "
        f"{bucket[0]}x{bucket[1]} window at x 0..{range_x}, y 0..{range_y} of the stored image",
        f"  {row['shard']}, member {row['key']}.{extension} (bytes {row['image_offset']}.."
        f"{row['image_offset'] + row['image_size']})",
        f"  caption: {caption!r}" if caption is not None else "  no caption",
    ]


def _rejected(row: dict, source: str) -> list[str]:
    return [
        f"  source {source}, {row['reason']}: {row['message']}",
        f"  (a file that {DESCRIBED.get(row['reason'], 'was rejected')})",
    ]


def summary(out: OutputDir, manifest: Manifest) -> str:
    """What OUT holds: images per bucket, rejections by reason, shards, settings."""
    filesystem = out.filesystem
    index = pq.read_table(out.path("index.parquet"), columns=["bucket"], filesystem=filesystem)
    rejects = pq.read_table(out.path("rejects.parquet"), columns=["reason"], filesystem=filesystem)
    per_bucket = sorted(pc.value_counts(index["bucket"]).to_pylist(), key=lambda c: c["values"])
    by_reason = sorted(pc.value_counts(rejects["reason"]).to_pylist(), key=lambda c: c["values"])
    reasons = ", ".join(f"{c['values']} {c['counts']}" for c in by_reason)
    lines = [
        f"{out.uri}: a prepared dataset (format {manifest.format_version}) of "
        f"{manifest.input['uri']}",
        f"{len(index):,} images in {len(per_bucket)} buckets, {len(manifest.shards)} shards",
        *(
            f"  {manifest.buckets[c['values']][0]}x{manifest.buckets[c['values']][1]}: "
            f"{c['counts']:,}"
            for c in per_bucket
        ),
        f"{len(rejects):,} rejected" + (f": {reasons}" if reasons else ""),
        "settings: "
        + ", ".join(f"{name}={value}" for name, value in flat_settings(manifest.settings).items()),
        f"report: {out.uri}/report.html",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
