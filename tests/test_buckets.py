"""Bucket generation and assignment: the source's list, argmin, thresholds, no-upscale."""

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pipeline.buckets import (
    MODEL_GRIDS,
    REJECT_ASPECT,
    REJECT_TOO_SMALL,
    BucketConfig,
    assign_buckets,
    assign_no_upscale,
    bucket_aspects,
    bucketize,
    generate_buckets,
    model_grid,
)

# The default list, worked out by hand from the post: widths 256..1024 with their tallest
# heights under 512*768 and 1024, the transposes, and 512x512; ordered tallest to widest.
SOURCE_DEFAULT_BUCKETS = [
    (256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768),
    (512, 704), (576, 640), (512, 512), (640, 576), (704, 512), (768, 512), (832, 448),
    (896, 384), (960, 384), (1024, 384), (1024, 320), (1024, 256),
]  # fmt: skip


def source_buckets(max_area=512 * 768, max_side=1024, min_side=256, step=64, square=512):
    """The post's algorithm, transcribed step by step."""
    found = []
    width = min_side
    while width <= max_side:
        height = max_side
        while width * height > max_area:
            height -= step
        if height >= min_side:
            found.append((width, height))
        width += step
    found += [(h, w) for w, h in found]
    return set(found) | {(square, square)}


sizes = st.integers(min_value=1, max_value=100_000)
configs = st.builds(
    lambda step, min_steps, extra_steps, area_steps, square_steps: dict(
        step=step,
        min_side=step * min_steps,
        max_side=step * (min_steps + extra_steps),
        max_area=(step * min_steps) ** 2 + area_steps * step * step,
        square_steps=square_steps,
    ),
    st.sampled_from([8, 32, 64]),
    st.integers(1, 8),
    st.integers(0, 16),
    st.integers(0, 200),
    st.integers(0, 16),
).map(
    lambda c: BucketConfig(
        step=c["step"],
        min_side=c["min_side"],
        max_side=c["max_side"],
        max_area=c["max_area"],
        square=c["min_side"]
        + c["step"]
        * min(
            c["square_steps"],
            (min(c["max_side"], math.isqrt(c["max_area"])) - c["min_side"]) // c["step"],
        ),
    )
)


def test_default_buckets_are_the_source_list():
    assert generate_buckets().tolist() == [list(b) for b in SOURCE_DEFAULT_BUCKETS]
    assert set(SOURCE_DEFAULT_BUCKETS) == source_buckets()


@given(configs)
def test_generation_follows_the_source_algorithm_for_any_limits(config):
    buckets = generate_buckets(config)
    assert {tuple(b) for b in buckets.tolist()} == source_buckets(
        config.max_area, config.max_side, config.min_side, config.step, config.square
    )
    aspects = bucket_aspects(buckets)
    assert np.all(np.diff(aspects) >= 0), "sorted by aspect"
    assert len({tuple(b) for b in buckets.tolist()}) == len(buckets), "no duplicates"


def test_larger_model_config():
    config = BucketConfig(max_area=1024 * 1024, max_side=2048, min_side=512, square=1024)
    buckets = generate_buckets(config)
    assert [1024, 1024] in buckets.tolist()
    assert np.all(buckets.prod(axis=1) <= 1024 * 1024)
    assert buckets.min() == 512 and buckets.max() == 2048
    assert np.all(buckets % 64 == 0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_area": 0}, "--max-area"),
        ({"step": -64}, "--step"),
        ({"min_side": 100}, "--min-side"),
        ({"max_side": 1.5}, "--max-side"),
        ({"min_side": 1024, "max_side": 512}, "--min-side"),
        ({"max_area": 128 * 128}, "--max-area"),
        ({"square": 1024}, "--square"),
        ({"metric": "cosine"}, "--metric"),
        ({"max_log_aspect_error": float("nan")}, "--max-log-aspect-error"),
        ({"max_log_aspect_error": -1.0}, "--max-log-aspect-error"),
    ],
)
def test_bad_config_names_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BucketConfig(**kwargs)


@given(
    st.lists(st.tuples(sizes, sizes), min_size=1, max_size=50),
    st.sampled_from(["linear", "log"]),
    st.lists(st.booleans(), min_size=19, max_size=19),
)
def test_assignment_is_argmin(images, metric, keep):
    buckets = generate_buckets()[np.array(keep)]
    assume(len(buckets) > 0)
    widths, heights = np.array(images).T
    index, error = assign_buckets(widths, heights, buckets, math.inf, metric)
    aspects = bucket_aspects(buckets)
    image_aspects = widths / heights
    key = np.log if metric == "log" else (lambda a: a)
    expected = np.argmin(np.abs(key(aspects)[None, :] - key(image_aspects)[:, None]), axis=1)
    assert index.tolist() == expected.tolist()
    np.testing.assert_array_equal(error, np.abs(aspects[expected] - image_aspects))


def test_ties_go_to_the_first_bucket_like_argmin():
    buckets = np.array([[512, 1024], [512, 512], [1024, 1024], [1024, 512]])  # two squares
    index, _ = assign_buckets([3, 1000, 1000], [4, 1000, 1], buckets, math.inf, "linear")
    # 0.75 is exactly between 0.5 and 1.0; the squares tie and argmin keeps the first.
    assert index.tolist() == [0, 1, 3]


@given(sizes, sizes, st.sampled_from(["linear", "log"]))
def test_tall_and_wide_images_are_dropped_alike(width, height, metric):
    buckets = generate_buckets()
    index, _ = assign_buckets([width, height], [height, width], buckets, metric=metric)
    assert (index[0] == REJECT_ASPECT) == (index[1] == REJECT_ASPECT)
    if metric == "log" and index[0] >= 0:  # the log metric also picks mirrored buckets
        assert buckets[index[0]].tolist() == buckets[index[1]][::-1].tolist()


def test_linear_metric_leans_to_the_lower_aspect_between_buckets():
    # 0.482 lies between buckets 0.429 (384x896) and 0.538 (448x832): linearly nearer the
    # first, by log distance nearer the second. Its transpose, 2.075, goes to 1.857 (832x448)
    # by both measures, so only the log metric maps the pair to mirrored buckets.
    buckets = generate_buckets()
    linear, _ = assign_buckets([482, 1000], [1000, 482], buckets, metric="linear")
    log, _ = assign_buckets([482, 1000], [1000, 482], buckets, metric="log")
    assert buckets[linear].tolist() == [[384, 896], [832, 448]]
    assert buckets[log].tolist() == [[448, 832], [832, 448]]


def test_default_threshold_keeps_8_to_1_and_drops_beyond_both_ways():
    index, error = assign_buckets(
        [8000, 1000, 8100, 1000, 1, 5000], [1000, 8000, 1000, 8100, 5000, 1], generate_buckets()
    )
    assert index.tolist() == [18, 0, REJECT_ASPECT, REJECT_ASPECT, REJECT_ASPECT, REJECT_ASPECT]
    assert error[0] == pytest.approx(4.0) and error[1] == pytest.approx(0.125)


@pytest.mark.parametrize(
    "widths, heights, name",
    [
        ([0, 10], [10, 10], "widths"),
        ([10, 10], [10, -3], "heights"),
        ([10, float("nan")], [10, 10], "widths"),
        ([10, 10], [10], "differ"),
        ([[10]], [[10]], "widths"),
        (["a"], ["b"], "widths"),
    ],
)
def test_bad_sizes_name_the_argument(widths, heights, name):
    with pytest.raises(ValueError, match=name):
        assign_buckets(widths, heights, generate_buckets())


def test_bad_bucket_arguments():
    with pytest.raises(ValueError, match="sorted"):
        assign_buckets([1], [1], generate_buckets()[::-1])
    with pytest.raises(ValueError, match="buckets"):
        assign_buckets([1], [1], np.zeros((0, 2)))
    with pytest.raises(ValueError, match="metric"):
        assign_buckets([1], [1], generate_buckets(), metric="l2")
    with pytest.raises(ValueError, match="max_log_aspect_error"):
        assign_buckets([1], [1], generate_buckets(), float("nan"))


def test_empty_input():
    index, error = assign_buckets(
        np.array([], dtype=int), np.array([], dtype=int), generate_buckets()
    )
    assert index.shape == error.shape == (0,)


def test_many_images_cross_chunk_boundaries():
    rng = np.random.default_rng(1)
    widths, heights = rng.integers(1, 5000, (2, 200_003))
    index, _ = assign_buckets(widths, heights, generate_buckets(), math.inf)
    aspects = bucket_aspects(generate_buckets())
    expected = np.argmin(np.abs(aspects[None, :] - (widths / heights)[:, None]), axis=1)
    assert np.array_equal(index, expected)


no_upscale = BucketConfig(no_upscale=True)


def test_no_upscale_grid():
    buckets = generate_buckets(no_upscale)
    assert np.all(buckets % 64 == 0) and buckets.min() == 256 and buckets.max() == 1024
    assert np.all(buckets.prod(axis=1) <= 512 * 768)
    assert len(buckets) == sum(
        1 for w in range(256, 1025, 64) for h in range(256, 1025, 64) if w * h <= 512 * 768
    )


@given(sizes, sizes)
def test_no_upscale_bucket_fits_inside_and_is_the_largest_that_does(width, height):
    buckets = generate_buckets(no_upscale)
    index, error = assign_no_upscale([width], [height], no_upscale)
    if index[0] == REJECT_TOO_SMALL:
        assert math.isnan(error[0])
        return
    if index[0] == REJECT_ASPECT:
        return
    shrink = min(1.0, math.sqrt(512 * 768 / (width * height)), 1024 / max(width, height))
    bucket_w, bucket_h = buckets[index[0]]
    assert bucket_w <= width and bucket_h <= height, "never upscaled"
    assert bucket_w <= width * shrink + 1e-6 and bucket_h <= height * shrink + 1e-6
    # One more step on either side would not fit the shrunk image or the limits.
    for w, h in ((bucket_w + 64, bucket_h), (bucket_w, bucket_h + 64)):
        assert (
            w > width * shrink + 1e-6
            or h > height * shrink + 1e-6
            or w * h > 512 * 768
            or max(w, h) > 1024
        )


def test_no_upscale_examples():
    index, _ = assign_no_upscale(
        [512, 700, 4000, 200, 1024, 300], [768, 700, 3000, 900, 384, 9000], no_upscale
    )
    buckets = generate_buckets(no_upscale)
    chosen = [buckets[i].tolist() if i >= 0 else int(i) for i in index]
    assert chosen == [
        [512, 768],  # a bucket size maps to itself
        [576, 576],  # 700x700 is too large: shrunk to 627x627, floored to 576x576
        [704, 512],  # 4000x3000 shrunk to 724x543
        REJECT_TOO_SMALL,  # 200 px wide: under min_side without upscaling
        [1024, 384],  # exactly at the area limit
        REJECT_TOO_SMALL,  # 1:30 shrunk to 1024 px tall is 34 px wide
    ]


def test_bucketize_dispatches_on_the_config():
    widths, heights = [1000, 200], [1000, 200]
    plain = bucketize(widths, heights)
    assert plain.buckets[plain.index].tolist() == [[512, 512], [512, 512]]
    grid = bucketize(widths, heights, no_upscale)
    assert grid.buckets[grid.index[0]].tolist() == [576, 576]
    assert grid.index[1] == REJECT_TOO_SMALL
    with pytest.raises(ValueError, match="no_upscale"):
        assign_no_upscale(widths, heights, BucketConfig())


# The SDXL paper's multi-aspect list (Podell et al. 2023, appendix), as (width, height).
SDXL_PAPER_BUCKETS = {
    (w, h)
    for h, w in [
        (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728),
        (576, 1664), (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344),
        (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
        (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
        (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704),
        (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576),
        (1856, 512), (1920, 512), (1984, 512), (2048, 512),
    ]
}  # fmt: skip


@pytest.mark.parametrize("model", list(MODEL_GRIDS))
def test_every_family_bucket_is_on_its_step_within_its_area_and_aspects(model):
    config = model_grid(model)
    buckets = generate_buckets(config)
    assert np.all(buckets % config.step == 0)
    assert np.all(buckets.prod(axis=1) <= config.max_area)
    assert np.all((buckets >= config.min_side) & (buckets <= config.max_side))
    aspects = bucket_aspects(buckets)
    assert aspects.min() >= config.min_side / config.max_side  # 1:4 at the megapixel families
    assert aspects.max() <= config.max_side / config.min_side
    assert (config.square, config.square) in set(map(tuple, buckets.tolist()))


def test_family_steps_follow_the_vae_and_the_denoiser():
    assert model_grid("sd") == BucketConfig()  # the source's grid, unchanged
    assert {model: model_grid(model).step for model in MODEL_GRIDS} == {
        "sd": 64,
        "sdxl": 64,
        "sd3": 16,
        "flux": 16,
    }
    for model in ("sdxl", "sd3", "flux"):  # ~1 MP: the largest bucket within 1/16 of 1024^2
        areas = generate_buckets(model_grid(model)).prod(axis=1)
        assert 1024 * 1024 * 15 / 16 <= areas.max() <= 1024 * 1024


def test_the_sdxl_grid_is_the_papers_list_less_its_seven_non_maximal_pairs():
    ours = set(map(tuple, generate_buckets(model_grid("sdxl")).tolist()))
    assert ours <= SDXL_PAPER_BUCKETS
    extra = SDXL_PAPER_BUCKETS - ours  # what docs/techniques.md says we leave out
    assert extra == {
        (832, 1152),
        (896, 1088),
        (960, 1024),
        (1024, 960),
        (1088, 896),
        (1152, 832),
        (1344, 704),
    }
    for width, height in extra:  # each is a step shorter than the area allows its width
        assert width * (height + 64) <= 1024 * 1024


def test_explicit_bucket_settings_override_a_familys():
    config = model_grid("sdxl", step=32, min_side=256)
    assert (config.step, config.min_side, config.max_area) == (32, 256, 1024 * 1024)
    with pytest.raises(ValueError, match="--model must be one of sd, sdxl, sd3, flux"):
        model_grid("sd2")
