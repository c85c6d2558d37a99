"""report.html: one page to look at a prepared dataset before training on it: each bucket's
images with the window training crops from them, what an epoch uses of each bucket, how far
the fit bent the images (aspect error, area cropped) with the worst ones, the rejections and
the groups of duplicates.

The page is self-contained (thumbnails inlined as JPEG data: URIs, charts as inline SVG), so
it opens from OUT's folder and from an object store's HTTP endpoint alike, and its size is
bounded whatever the dataset's: a fixed number of thumbnails per bucket, reason and group.
Kept images are decoded from the stored shards (one ranged read a member, by the index's
offsets), never from the inputs; a rejected file from the input only when it is a local file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from string import Template

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.fit import fit_measures
from pipeline.format import OutputDir
from pipeline.inputs import Input
from pipeline.rejects import COPY_REASONS, DESCRIPTIONS, Reason, kept_copy
from pipeline.report import epoch_by_bucket, rank_plans

SAMPLES_PER_BUCKET = 8  # the contact sheet of each bucket: its images with the smallest keys
WORST_SHOWN = 8  # of the largest aspect error, and of the largest share cropped
REJECTS_PER_REASON = 5  # the first by source
GROUPS_SHOWN, COPIES_SHOWN = 12, 4  # duplicate groups, largest first, and copies of each
THUMBNAIL_SIDE = 128  # pixels, the longer side
THUMBNAIL_QUALITY = 70
INPUT_THUMBNAIL_BYTES = 32 << 20  # a rejected input file larger is not decoded for the page
# Rejections whose files are decoded for a thumbnail: images the scan found within
# --max-pixels (never a decompression bomb, a symlink out of the input, a FIFO)
PICTURED = {
    *COPY_REASONS,
    *(
        reason.value
        for reason in (
            Reason.CORRUPT,
            Reason.ASPECT,
            Reason.TOO_SMALL,
            Reason.UPSCALE,
            Reason.CROP,
            Reason.CAPTION_ENCODING,
            Reason.BAD_CAPTION,
            Reason.CHANGED,
        )
    ),
}
HISTOGRAM_BINS = 20
DESCRIBED = {reason.value: text for reason, text in DESCRIPTIONS.items()}
PAGE_COLUMNS = [
    "key",
    "source",
    "width",
    "height",
    "bucket",
    "aspect_error",
    "stored_width",
    "stored_height",
    "shard",
    "image_offset",
    "image_size",
]


def crop_windows(stored: tuple[int, int], bucket: tuple[int, int]) -> list[tuple[int, ...]]:
    """(x, y, width, height) of the extreme windows a training crop can take from a stored
    image in its own bucket: at offset 0 and at the largest offset (one window when the image
    is stored at the bucket's size, cropped or without overflow). The loader's window lies
    between them (`pipeline.fit.crop_box`)."""
    (stored_w, stored_h), (bucket_w, bucket_h) = stored, bucket
    first = (0, 0, bucket_w, bucket_h)
    last = (stored_w - bucket_w, stored_h - bucket_h, bucket_w, bucket_h)
    return [first] if last == first else [first, last]


def write_report_page(
    out: OutputDir, stats: dict, buckets: np.ndarray, seed: int, source: Input | None
) -> None:
    """OUT/report.html for the dataset OUT's index, rejects.parquet and `stats` (stats.json's
    content) describe; `source` is the input, for thumbnails of rejected local files."""
    filesystem = out.filesystem
    index = pq.read_table(out.path("index.parquet"), columns=PAGE_COLUMNS, filesystem=filesystem)
    rejects = pq.read_table(
        out.path("rejects.parquet"), columns=["source", "reason", "message"], filesystem=filesystem
    )
    page = _Page(out, index, buckets, source)
    body = "\n".join(
        [
            page.overview(stats),
            page.buckets(stats["epoch"], seed),
            page.fit(),
            page.rejections(rejects, stats["rejections_by_reason"]),
            page.duplicates(rejects),
        ]
    )
    title = f"{stats['images']:,} images: {out.uri}"
    text = PAGE.substitute(title=_e(title), body=body)
    out.write_bytes(out.path("report.html"), text.encode())


class _Page:
    """The page's sections, from the index's PAGE_COLUMNS; thumbnails by index row."""

    def __init__(self, out: OutputDir, index: pa.Table, buckets: np.ndarray, source: Input | None):
        self.out, self.index, self.grid, self.source = out, index, buckets, source
        self.bucket = index["bucket"].to_numpy()
        width, height = index["width"].to_numpy(), index["height"].to_numpy()
        self.aspect_error = index["aspect_error"].to_numpy()
        self.cropped = fit_measures(
            width, height, buckets[self.bucket, 0], buckets[self.bucket, 1]
        )[1]
        self.thumbnails: dict[int, str | None] = {}

    def overview(self, stats: dict) -> str:
        used = sum(bucket["images"] > 0 for bucket in stats["buckets"])
        warnings = "".join(f'<p class="warning">{_e(w)}</p>' for w in stats["warnings"])
        return (
            f"<h1>{stats['images']:,} images in {used} buckets, {stats['rejected']:,} rejected"
            f"</h1><p>{_e(self.out.uri)}: stats.json has the numbers, rejects.parquet every "
            "rejected file; <code>arb-inspect OUT PATH</code> says where a file went. The "
            "yellow frames are the windows a training crop takes: one, or the first and the "
            f"last (dashed) of those it may take.</p>{warnings}"
        )

    def buckets(self, epoch: dict, seed: int) -> str:
        """Each used bucket: its size and count, its epoch, a contact sheet of its images."""
        batch_size, world_size = epoch["batch_size"], epoch["world_size"]
        plans = rank_plans(
            self.bucket,
            self.index["width"].to_numpy() / self.index["height"].to_numpy(),
            self.grid,
            batch_size,
            world_size,
            seed,
        )
        figures = epoch_by_bucket(plans, self.bucket, len(self.grid))
        order = pc.sort_indices(self.index, [("bucket", "ascending"), ("key", "ascending")])
        order = order.to_numpy()
        starts = np.searchsorted(self.bucket[order], np.arange(len(self.grid) + 1))
        samples = {
            b: order[starts[b] : min(starts[b + 1], starts[b] + SAMPLES_PER_BUCKET)]
            for b in range(len(self.grid))
        }
        self._thumbnail_rows(np.concatenate([np.zeros(0, np.int64), *samples.values()]))
        rows, sheets = [], []
        for b, (bucket_w, bucket_h) in enumerate(self.grid.tolist()):
            images, used = int(figures["images"][b]), int(figures["used"][b])
            if not images:
                continue
            caught, left = int(figures["catch_all"][b]), int(figures["left_out"][b])
            rows.append(
                f"<tr><td>{bucket_w}x{bucket_h}</td><td>{images:,}</td><td>{used:,}</td>"
                f"<td>{caught:,}</td><td>{left:,}</td></tr>"
            )
            sheets.append(
                f'<section class="bucket" data-bucket="{b}" data-size="{bucket_w}x{bucket_h}" '
                f'data-images="{images}"><h3>{bucket_w}x{bucket_h}: {_count(images, "image")}, '
                f"{used:,} in epoch 0 ({caught:,} of them in catch-all batches), {left:,} left "
                f"out</h3>{self._sheet(samples[b])}</section>"
            )
        return (
            f'<h2 id="buckets">Buckets and epoch 0 at batch size {batch_size} x world size '
            f"{world_size}</h2><p>{epoch['images_used']:,} images used, "
            f"{epoch['catch_all_images']:,} in catch-all batches (fitted to a neighbouring "
            f"bucket), {epoch['images_dropped']:,} left out; by each image's own bucket:</p>"
            '<table class="epoch"><tr><th>bucket</th><th>images</th><th>used</th>'
            f"<th>catch-all</th><th>left out</th></tr>{''.join(rows)}</table>" + "".join(sheets)
        )

    def fit(self) -> str:
        """Histograms of the aspect error and of the area cropped, and the worst images."""
        parts = []
        for name, values, label in (
            ("aspect_error", self.aspect_error, "aspect error |bucket aspect - image aspect|"),
            ("area_cropped", self.cropped, "share of the area the fit crops"),
        ):
            worst = np.argsort(-values, kind="stable")[:WORST_SHOWN]
            worst = worst[values[worst] > 0]  # an image the fit did not bend is no example
            self._thumbnail_rows(worst)
            parts.append(
                f'<div class="measure" id="{name}"><h3>{label}</h3>{_histogram(values)}'
                f"<p>largest:</p>{self._sheet(worst, values)}</div>"
            )
        return f'<h2 id="fit">How the fit bends the images</h2>{"".join(parts)}'

    def rejections(self, rejects: pa.Table, by_reason: dict[str, int]) -> str:
        """Each reason with its count and description, and its first files by source."""
        parts = []
        for reason, count in by_reason.items():
            first = rejects.filter(pc.equal(rejects["reason"], reason)).slice(0, REJECTS_PER_REASON)
            items = "".join(
                f'<li class="rejected" data-source="{_e(row["source"])}">'
                f"{self._input_thumbnail(row['source'], reason)}<code>{_e(row['source'])}</code> "
                f"{_e(row['message'] or '')}</li>"
                for row in first.to_pylist()
            )
            more = f"<li>... and {count - len(first):,} more</li>" if count > len(first) else ""
            described = DESCRIBED.get(reason, "")
            parts.append(
                f'<div class="reason" data-reason="{_e(reason)}" data-count="{count}">'
                f"<h3>{_e(reason)}: {count:,}</h3><p>{_e(described)}</p>"
                f"<ul>{items}{more}</ul></div>"
            )
        return f'<h2 id="rejections">Rejections</h2>{"".join(parts) or "<p>none</p>"}'

    def duplicates(self, rejects: pa.Table) -> str:
        """Copies of a kept image (exact or near), grouped by the one kept, largest first."""
        copies = rejects.filter(pc.is_in(rejects["reason"], pa.array(COPY_REASONS)))
        groups: dict[str, list[tuple[str, str]]] = {}  # kept -> (source, reason) of its copies
        for row in copies.to_pylist():
            kept = kept_copy(row["source"], row["reason"], row["message"])
            if kept is not None:
                groups.setdefault(kept, []).append((row["source"], row["reason"]))
        shown = sorted(groups.items(), key=lambda group: (-len(group[1]), group[0]))[:GROUPS_SHOWN]
        kept_sources = pa.array([kept for kept, _ in shown], pa.string())
        rows = pc.index_in(kept_sources, self.index["source"]).to_numpy(zero_copy_only=False)
        self._thumbnail_rows(np.array([r for r in rows if r == r], np.int64))  # NaN: not kept
        parts = []
        for (kept, sources), row in zip(shown, rows, strict=True):
            kept_thumbnail = self.thumbnails.get(int(row)) if row == row else None
            items = "".join(
                f'<li class="copy" data-source="{_e(s)}">{self._input_thumbnail(s, reason)}'
                f"<code>{_e(s)}</code></li>"
                for s, reason in sources[:COPIES_SHOWN]
            )
            more = f"<li>... and {len(sources) - COPIES_SHOWN:,} more</li>" * (
                len(sources) > COPIES_SHOWN
            )
            parts.append(
                f'<div class="group" data-kept="{_e(kept)}"><ul><li class="kept" '
                f'data-source="{_e(kept)}">{_img(kept_thumbnail)}<code>{_e(kept)}</code> '
                f"<strong>kept</strong></li>{items}{more}</ul></div>"
            )
        copied = sum(map(len, groups.values()))
        total = f"{_count(len(groups), 'group')}, {_count(copied, 'copy', 'copies')} rejected"
        return f'<h2 id="duplicates">Duplicates: {total}</h2>{"".join(parts) or "<p>none</p>"}'

    def _sheet(self, rows: Iterable[int], values: np.ndarray | None = None) -> str:
        """Thumbnails of index rows, each with its crop windows and, on hover, its source."""
        figures = []
        for row in rows:
            row = int(row)
            stored = (
                int(self.index["stored_width"][row].as_py()),
                int(self.index["stored_height"][row].as_py()),
            )
            bucket = tuple(int(v) for v in self.grid[self.bucket[row]])
            source = self.index["source"][row].as_py()
            size = f"{self.index['width'][row].as_py()}x{self.index['height'][row].as_py()}"
            title = f"{source}\n{size} source, stored {stored[0]}x{stored[1]}"
            windows = "".join(
                f'<rect class="window{" last" * i}" x="{x}" y="{y}" width="{w}" height="{h}"/>'
                for i, (x, y, w, h) in enumerate(crop_windows(stored, bucket))
            )
            label = f"{values[row]:.3f}" if values is not None else size
            figures.append(
                f'<figure class="sample" data-key="{self.index["key"][row].as_py()}" '
                f'data-stored="{stored[0]}x{stored[1]}" data-bucket="{bucket[0]}x{bucket[1]}" '
                f'title="{_e(title)}"><div class="frame">{_img(self.thumbnails.get(row))}'
                f'<svg viewBox="0 0 {stored[0]} {stored[1]}" preserveAspectRatio="none">'
                f"{windows}</svg></div><figcaption>{_e(label)}</figcaption></figure>"
            )
        return f'<div class="sheet">{"".join(figures)}</div>'

    def _thumbnail_rows(self, rows: np.ndarray) -> None:
        """Thumbnails of index `rows` not made yet, read from their shards, a shard opened once."""
        todo = sorted({int(r) for r in rows} - self.thumbnails.keys())
        if not todo:
            return
        members = self.index.take(todo).select(["shard", "image_offset", "image_size"])
        by_shard: dict[str, list[tuple[int, int, int]]] = {}
        for row, member in zip(todo, members.to_pylist(), strict=True):
            place = (row, member["image_offset"], member["image_size"])
            by_shard.setdefault(member["shard"], []).append(place)
        for shard, places in by_shard.items():
            with self.out.filesystem.open_input_file(self.out.path(shard)) as stream:
                for row, offset, size in places:
                    self.thumbnails[row] = _thumbnail(stream.read_at(size, offset))

    def _input_thumbnail(self, source: str, reason: str) -> str:
        """A rejected file's thumbnail, when it is PICTURED, the input local and the source a
        file on it (not a tar member, a Parquet row or a URL a listing names) of a size worth
        decoding; else nothing."""
        if reason not in PICTURED or self.source is None or not self.source.local:
            return ""
        if "://" in source:
            return ""
        filesystem, path = self.source.resolve(source)
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File or info.size > INPUT_THUMBNAIL_BYTES:
            return ""
        with filesystem.open_input_file(path) as stream:
            return _img(_thumbnail(stream.readall()))


def _thumbnail(data: bytes) -> str | None:
    """A JPEG data: URI of the image in `data`, THUMBNAIL_SIDE at most; None if it does not
    decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # JPEG: decoded at 1/2..1/8
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            small.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    except Exception:  # a corrupt or unsupported file: shown by its message alone
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _count(number: int, noun: str, plural: str = "") -> str:
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def _img(uri: str | None) -> str:
    return f'<img src="{uri}" alt="">' if uri else ""


def _histogram(values: np.ndarray) -> str:
    """An inline SVG bar chart of `values` in HISTOGRAM_BINS bins from 0 to their maximum."""
    top = float(values.max()) if len(values) and values.max() > 0 else 1.0
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, top))
    width, height, bar = 400, 120, 400 / HISTOGRAM_BINS
    tallest = max(1, int(counts.max()) if len(counts) else 1)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - height * n / tallest:.1f}" '
        f'width="{bar - 1:.1f}" height="{height * n / tallest:.1f}">'
        f"<title>{edges[i]:.3f} to {edges[i + 1]:.3f}: {n:,} images</title></rect>"
        for i, n in enumerate(counts.tolist())
    )
    return (
        f'<svg class="histogram" viewBox="0 -14 {width} {height + 30}" width="{width}" '
        f'height="{height + 44}"><text x="0" y="-2">{tallest:,} images</text>{bars}'
        f'<text x="0" y="{height + 14}">0</text>'
        f'<text x="{width}" y="{height + 14}" text-anchor="end">{top:.3f}</text></svg>'
    )


def _e(text: object) -> str:
    return html.escape(str(text))


PAGE = Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1em; margin: 1.2em 0 .4em; }
table.epoch { border-collapse: collapse; }
table.epoch td, table.epoch th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
.sheet { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-end; }
figure.sample { margin: 0; font-size: 11px; text-align: center; }
.frame { position: relative; display: inline-block; line-height: 0; background: #eee; }
.frame img { display: block; max-width: 128px; max-height: 128px; }
.frame svg { position: absolute; inset: 0; width: 100%; height: 100%; }
rect.window { fill: #ffd400; fill-opacity: .12; stroke: #ffd400; stroke-width: 2;
  vector-effect: non-scaling-stroke; }
rect.window.last { stroke-dasharray: 4 3; }
.histogram rect { fill: #4c72b0; } .histogram text { font-size: 11px; }
.measure { display: inline-block; vertical-align: top; margin-right: 3em; }
ul { list-style: none; padding-left: 0; }
li img { max-width: 64px; max-height: 64px; vertical-align: middle; margin-right: 6px; }
li.kept { font-weight: bold; } .group { border-left: 3px solid #4c72b0; padding-left: 8px; }
.warning { color: #b00; }
</style></head>
<body data-broken="unknown">
$body
<script>
addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.broken = images.filter(i => !i.complete || !i.naturalWidth).length;
});
</script>
</body></html>
"""
)
