"""Aspect ratio bucketing data preparation: a pure NumPy core and, around it, the Ray job.

Core modules (NumPy only, no Ray, no torch, no I/O):
    buckets     bucket resolutions and the assignment of images to them
    fit         the resize size and crop box that fit an image to its bucket
    plan        the per-epoch sharding plan: each rank's single-resolution batches
    shard_plan  which images go into which bucket-homogeneous shard
    work_plan   tasks of bounded real duration, sized by what the run measures

The job around them (README's Layout table has one line a module): inputs resolves the input
once, sources lists it, readers read its files, scan reads headers, assign buckets the images,
imaging decodes and fits, shard_writer writes, output keeps OUT, distributor is the Ray layer,
prepare runs the stages, latents is the optional VAE stage, text_cache (with
text_encoders) the optional text stage; report writes stats.json and buckets.png,
report_page report.html, and inspect (`arb-inspect`) says where an input file went. format is
the on-disk format they write and the trainer reads.
"""
