"""Aspect ratio bucketing data preparation: a pure NumPy core and, around it, the Ray job.

Core modules (NumPy only, no Ray, no torch):
    buckets  bucket resolutions and the assignment of images to them
    fit      the resize size and crop box that fit an image to its bucket
    plan     the per-epoch sharding plan: each rank's single-resolution batches
"""
