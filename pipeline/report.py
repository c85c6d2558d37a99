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
from pipeline.plan import plan_epoch


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"mean": None, "median": None, "max": None}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


def epoch_report(
    bucket_index: np.ndarray,
    item_aspects: np.ndarray,
    buckets: np.ndarray,
    batch_size: int,
    world_size: int,
    seed: int,
) -> dict:
    """Epoch 0 for every rank: items used and dropped, catch-all items and their aspect error."""
    plans = [
        plan_epoch(bucket_index, batch_size, world_size, rank, seed, 0,
                   item_aspects=item_aspects, bucket_aspects=bucket_aspects(buckets))
        for rank in range(world_size)
    ]  # fmt: skip
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


def dataset_stats(
    columns: dict[str, np.ndarray],
    buckets: np.ndarray,
    reject_reasons: pa.ChunkedArray,
    batch_size: int,
    world_size: int,
    seed: int,
) -> dict:
    """stats.json's content from the index columns width, height, bucket and aspect_error."""
    width, height, bucket = columns["width"], columns["height"], columns["bucket"]
    upscale, cropped = fit_measures(width, height, buckets[bucket, 0], buckets[bucket, 1])
    counts = np.bincount(bucket, minlength=len(buckets))
    epoch = epoch_report(bucket, width / height, buckets, batch_size, world_size, seed)
    return {
        "images": len(width),
        "rejected": len(reject_reasons),
        "rejections_by_reason": {
            count["values"]: count["counts"]
            for count in sorted(
                pc.value_counts(reject_reasons).to_pylist(), key=lambda c: c["values"]
            )
        },
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


DROPPED_WARNING_SHARE = 0.05  # warn when truncation leaves out more of an epoch than this


def _warnings(images: int, epoch: dict) -> list[str]:
    if not images or epoch["images_dropped"] <= DROPPED_WARNING_SHARE * images:
        return []
    return [
        f"an epoch at batch size {epoch['batch_size']} x world size {epoch['world_size']} uses "
        f"{epoch['images_used']} of {images} images: every rank needs whole batches. Give "
        "--batch-size and --world-size as you will train (they only shape this report), or "
        "train with smaller batches"
    ]


def summary(stats: dict, shards: int, output: str) -> str:
    """What a run made, for people: kept and rejected, buckets, an epoch's use, where it is."""
    used_buckets = sum(bucket["images"] > 0 for bucket in stats["buckets"])
    reasons = ", ".join(f"{r} {n}" for r, n in stats["rejections_by_reason"].items())
    epoch = stats["epoch"]
    share = epoch["images_used"] / stats["images"] if stats["images"] else 0.0
    lines = [
        f"{stats['images']} images kept in {used_buckets} buckets, {shards} shards: {output}",
        f"{stats['rejected']} rejected" + (f": {reasons} (see rejects.parquet)" if reasons else ""),
        f"one epoch at batch size {epoch['batch_size']} x world size {epoch['world_size']}: "
        f"{epoch['images_used']} of {stats['images']} images ({share:.0%}), "
        f"{epoch['catch_all_images']} of them in catch-all batches",
        *(
            f"latents of VAE {fingerprint}: {count} in {output}/latents/{fingerprint}"
            for fingerprint, count in stats.get("latents", {}).items()
        ),
        *(f"warning: {warning}" for warning in stats["warnings"]),
        f"files: {output}/index.parquet, shards/, rejects.parquet, stats.json, buckets.png; "
        "docs/format.md describes them",
    ]
    return "\n".join(lines)


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
    left.set_ylabel("images")
    left.yaxis.get_major_locator().set_params(integer=True)
    epoch = stats["epoch"]
    left.set_title(
        f"{stats['images']:,} images in {sum(c > 0 for c in counts)} buckets; one epoch at "
        f"{epoch['world_size']} x {epoch['batch_size']}: "
        f"{epoch['catch_all_images']:,} to catch-all, {epoch['images_dropped']:,} dropped"
    )
    reasons = stats["rejections_by_reason"]
    right.barh(list(reasons) or ["none"], list(reasons.values()) or [0], color="#C44E52")
    right.set_title(f"{stats['rejected']:,} rejected")
    right.invert_yaxis()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    pyplot.close(figure)
    return buffer.getvalue()
