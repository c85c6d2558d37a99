"""What a prepared dataset holds and what one training epoch of it does: stats.json, buckets.png.

Numbers come from the index's numeric columns only; the epoch figures come from running the
planner itself (`plan.plan_epoch`) for every rank, so they are what the trainer will see.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.buckets import bucket_aspects
from pipeline.fit import fit_measures
from pipeline.plan import RankPlan, epoch_use_warning, plan_epoch
from pipeline.rejects import DESCRIPTIONS, Reason

REJECTS_NAMED = 5  # rejected files stats.json and the summary name; rejects.parquet has them all


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"mean": None, "median": None, "max": None}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


def rank_plans(
    bucket_index: np.ndarray,
    item_aspects: np.ndarray,
    buckets: np.ndarray,
    batch_size: int,
    world_size: int,
    seed: int,
) -> list[RankPlan]:
    """Epoch 0's plan of every rank, as the trainer will draw it."""
    return [
        plan_epoch(
            bucket_index,
            batch_size,
            world_size,
            rank,
            seed,
            0,
            item_aspects=item_aspects,
            bucket_aspects=bucket_aspects(buckets),
        )
        for rank in range(world_size)
    ]


def epoch_report(
    bucket_index: np.ndarray,
    item_aspects: np.ndarray,
    buckets: np.ndarray,
    batch_size: int,
    world_size: int,
    seed: int,
) -> dict:
    """Epoch 0 for every rank: items used and dropped, catch-all items and their aspect error."""
    plans = rank_plans(bucket_index, item_aspects, buckets, batch_size, world_size, seed)
    catch_all = sum(plan.catch_all_items for plan in plans)
    error_sum = sum(
        plan.catch_all_items * plan.catch_all_aspect_error for plan in plans if plan.catch_all_items
    )
    return {
        "batch_size": batch_size,
        "world_size": world_size,
        "batches_per_rank": len(plans[0]),
        "images_used": int(sum(plan.items.size for plan in plans)),
        "images_dropped": plans[0].dropped,
        "catch_all_images": int(catch_all),
        "catch_all_aspect_error_mean": float(error_sum / catch_all) if catch_all else None,
    }


def epoch_by_bucket(plans: list[RankPlan], bucket_index: np.ndarray, buckets: int) -> dict:
    """Per bucket (B,) arrays of epoch 0 (`rank_plans`): `images`, `used`, `catch_all` (used in
    catch-all batches, fitted to a neighbouring bucket) and `left_out`, by each image's own
    bucket."""
    used, catch_all = np.zeros(buckets, np.int64), np.zeros(buckets, np.int64)
    for plan in plans:
        used += np.bincount(bucket_index[plan.items.ravel()], minlength=buckets)
        caught = plan.items[plan.catch_all].ravel()
        catch_all += np.bincount(bucket_index[caught], minlength=buckets)
    images = np.bincount(bucket_index, minlength=buckets)
    return {"images": images, "used": used, "catch_all": catch_all, "left_out": images - used}


def dataset_stats(
    columns: dict[str, np.ndarray],
    buckets: np.ndarray,
    rejects: pa.Table,
    batch_size: int,
    world_size: int,
    seed: int,
) -> dict:
    """stats.json's content from the index columns width, height, bucket and aspect_error, and
    the rejects table (sorted by source)."""
    width, height, bucket = columns["width"], columns["height"], columns["bucket"]
    upscale, cropped = fit_measures(width, height, buckets[bucket, 0], buckets[bucket, 1])
    counts = np.bincount(bucket, minlength=len(buckets))
    epoch = epoch_report(bucket, width / height, buckets, batch_size, world_size, seed)
    return {
        "images": len(width),
        "rejected": len(rejects),
        "rejections_by_reason": {
            count["values"]: count["counts"]
            for count in sorted(
                pc.value_counts(rejects["reason"]).to_pylist(), key=lambda c: c["values"]
            )
        },
        "rejected_first": rejects.slice(0, REJECTS_NAMED)
        .select(["source", "reason", "message"])
        .to_pylist(),
        "buckets": [
            {"bucket": i, "width": int(w), "height": int(h), "images": int(n)}
            for i, ((w, h), n) in enumerate(zip(buckets, counts, strict=True))
        ],
        "aspect_error": _summary(columns["aspect_error"]),
        "area_cropped": _summary(cropped),
        "upscaled_share": float(np.mean(upscale > 1)) if len(width) else None,
        "upscale_factor": _summary(upscale[upscale > 1]),
        "epoch": epoch,
        "warnings": _warnings(len(width), epoch),
    }


def _warnings(images: int, epoch: dict) -> list[str]:
    warning = epoch_use_warning(
        images, epoch["images_used"], epoch["batch_size"], epoch["world_size"]
    )
    if warning is None:
        return []
    return [
        f"{warning}. Give --batch-size and --world-size as you will train (they only shape this "
        "report)"
    ]


def summary(stats: dict, shards: int, output: str) -> str:
    """What a run made, for people: kept and rejected, buckets, an epoch's use, where it is."""
    used_buckets = sum(bucket["images"] > 0 for bucket in stats["buckets"])
    reasons = ", ".join(f"{r} {n}" for r, n in stats["rejections_by_reason"].items())
    epoch = stats["epoch"]
    share = epoch["images_used"] / stats["images"] if stats["images"] else 0.0
    lines = [
        f"{stats['images']} images kept in {used_buckets} buckets, {shards} shards: {output}",
        f"{stats['rejected']} rejected" + (f": {reasons}" if reasons else ""),
        *_rejected_lines(stats, output),
        f"one epoch at batch size {epoch['batch_size']} x world size {epoch['world_size']}: "
        f"{epoch['images_used']} of {stats['images']} images ({share:.0%}), "
        f"{epoch['catch_all_images']} of them in catch-all batches",
        *(
            f"latents of VAE {fingerprint}: {count} in {output}/latents/{fingerprint}"
            for fingerprint, count in stats.get("latents", {}).items()
        ),
        *_timing_lines(stats.get("stages", {})),
        *(f"warning: {warning}" for warning in stats["warnings"]),
        f"files: {output}/index.parquet, shards/, rejects.parquet, stats.json, buckets.png, "
        "report.html; docs/format.md describes them; arb-inspect OUT PATH says where a file went",
    ]
    return "\n".join(lines)


def _timing_lines(stages: dict[str, dict]) -> list[str]:
    """How long each stage took, and its rate where it handled items."""
    if not stages:
        return []
    parts = []
    for name, stage in sorted(stages.items(), key=lambda item: item[1]["started"]):
        rate = ""
        if stage["items"] and stage["seconds"] > 0:
            unit = "files" if name in ("list", "scan") else "images"
            rate = f" ({stage['items'] / stage['seconds']:,.0f} {unit}/s)"
        parts.append(f"{name} {stage['seconds']:.1f} s{rate}")
    return [f"stages: {', '.join(parts)}"]


def _rejected_lines(stats: dict, output: str) -> list[str]:
    """The first rejected files by name, and the command that lists them all: a user should not
    have to know Parquet to learn which file was corrupt."""
    if not stats["rejected"]:
        return []
    first = stats.get("rejected_first", [])  # absent from a stats.json of an older run
    more = stats["rejected"] - len(first)
    listing = (
        'python3 -c "import sys, pyarrow.csv as csv, pyarrow.parquet as pq; csv.write_csv('
        f"pq.read_table('{output}/rejects.parquet', columns=['source', 'reason', 'message']), "
        'sys.stdout.buffer)"'
    )
    named = [
        f"  {r['source']} ({r['reason']}) {DESCRIPTIONS[Reason(r['reason'])]}{_said(r)}"
        for r in first
    ]
    return [
        *named,
        *([f"  ... and {more} more"] if more else []),
        f"  every rejected file with its message, as CSV: {listing}",
    ]


MESSAGE_SHOWN = 120  # characters of a rejection's own message in the summary


def _said(rejected: dict) -> str:
    """What a rejection's message adds (the kept copy, the decoder's words), on one line."""
    message = " ".join((rejected.get("message") or "").split())
    if len(message) > MESSAGE_SHOWN:
        message = message[: MESSAGE_SHOWN - 3] + "..."
    return f": {message}" if message else ""


def draw_buckets(stats: dict) -> bytes:
    """PNG: a bar chart of images per bucket, tallest to widest, and rejections by reason."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(
        1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]}, constrained_layout=True
    )
    labels = [f"{b['width']}x{b['height']}" for b in stats["buckets"]]
    counts = [b["images"] for b in stats["buckets"]]
    bars = left.bar(range(len(counts)), counts, color="#4C72B0")
    left.bar_label(bars, fontsize=7)
    left.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    left.set_xlabel("bucket (width x height)")
    left.set_ylabel("images")
    left.yaxis.get_major_locator().set_params(integer=True)
    epoch = stats["epoch"]
    left.set_title(
        f"{stats['images']:,} images in {sum(c > 0 for c in counts)} buckets; one epoch at "
        f"world size {epoch['world_size']} x batch size {epoch['batch_size']}: "
        f"{epoch['catch_all_images']:,} to catch-all batches, {epoch['images_dropped']:,} dropped"
    )
    reasons = stats["rejections_by_reason"]
    bars = right.barh(list(reasons) or ["none"], list(reasons.values()) or [0], color="#C44E52")
    right.bar_label(bars, fontsize=7, padding=2)
    right.set_xlim(0, 1.12 * max([1, *reasons.values()]))  # room for the longest bar's label
    right.set_title(f"{stats['rejected']:,} rejected")
    right.set_xlabel("files")
    right.set_ylabel("reason")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.invert_yaxis()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    pyplot.close(figure)
    return buffer.getvalue()
