"""docs/format.md against pipeline/format.py, the format in code: every column of every schema
documented with its type, the version, the members' and the manifest's fields, the rejection
reasons; and the format's own writing: tars as WebDataset writes them, parts that point at their
members, VAE fingerprints."""

from __future__ import annotations

import dataclasses
import io
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline import format as dataset_format
from pipeline.format import (
    CROP_COLUMNS,
    FORMAT_VERSION,
    INDEX_COLUMNS,
    INDEX_SCHEMA,
    JSON_MEMBER_FIELDS,
    READABLE_FORMAT_VERSIONS,
    TAR_MODE,
    TAR_MTIME,
    TAR_OWNER,
    Manifest,
    OutputDir,
    vae_fingerprint,
    write_tar,
)
from pipeline.rejects import DESCRIPTIONS, Reason

DOCUMENT = (Path(__file__).resolve().parent.parent / "docs" / "format.md").read_text()
# Every schema in pipeline/format.py, and the sections whose column tables document it.
SCHEMA_SECTIONS = {
    "INDEX_SCHEMA": ["index.parquet"],
    "PART_SCHEMA": ["index.parquet", "parts/NAME.parquet"],
    "REJECTS_SCHEMA": ["rejects.parquet"],
    "LATENT_INDEX_SCHEMA": ["Latents"],
    "TEXT_INDEX_SCHEMA": ["Text cache"],
}


def section(title: str) -> str:
    """The text under `## title`, up to the next section."""
    return DOCUMENT.split(f"\n## {title}\n")[1].split("\n## ")[0]


def tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables in `text`: rows of cells, the header row first."""
    found, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not line.startswith("| ---"):
                rows.append([cell.strip() for cell in line.strip()[1:-1].split(" | ")])
        elif rows:
            found.append(rows)
            rows = []
    return found


def documented_columns(title: str) -> dict[str, pa.DataType]:
    """Column -> type, as the section's `| column | type | meaning |` tables give them."""
    columns = {}
    for header, *rows in tables(section(title)):
        if header == ["column", "type", "meaning"]:
            for names, type_name, _ in rows:
                for name in re.findall(r"`([a-z_]+)`", names):
                    columns[name] = pa.type_for_alias(type_name)
    return columns


def test_every_schema_of_the_format_has_its_sections():
    schemas = {name for name, value in vars(dataset_format).items() if isinstance(value, pa.Schema)}
    assert schemas == set(SCHEMA_SECTIONS), "a new schema needs its table in docs/format.md"


@pytest.mark.parametrize("name", sorted(SCHEMA_SECTIONS))
def test_every_column_is_documented_with_its_type(name):
    documented = {}
    for title in SCHEMA_SECTIONS[name]:
        documented |= documented_columns(title)
    schema = getattr(dataset_format, name)
    assert documented == {field.name: field.type for field in schema}


def test_the_version_is_the_one_the_page_states():
    assert re.match(r"# The prepared dataset \(format version (\d+)\)", DOCUMENT)[1] == str(
        FORMAT_VERSION
    )
    readable = re.search(r"trainer\s+reads\s+(\d+(?:(?:,\s+|\s+and\s+)\d+)*)", DOCUMENT)[1]
    assert tuple(int(number) for number in re.findall(r"\d+", readable)) == (
        READABLE_FORMAT_VERSIONS
    )


def test_the_shards_members_and_tar_conventions_are_documented():
    members = {row[0]: row[1] for row in tables(section("Shards"))[0][1:]}
    assert set(re.findall(r"`([a-z_]+)`", members["`KEY.json`"])) == set(JSON_MEMBER_FIELDS)
    assert f"mtime {TAR_MTIME}, owner `{TAR_OWNER}`, mode {TAR_MODE:04o}" in section("Shards")


def test_the_manifest_section_names_every_field():
    text = section("manifest.json")
    assert [f.name for f in dataclasses.fields(Manifest) if f"`{f.name}`" not in text] == []


def test_every_rejection_reason_is_documented():
    (reasons,) = [table for table in tables(section("rejects.parquet")) if table[0][0] == "reason"]
    assert set(DESCRIPTIONS) == set(Reason)
    assert dict(reasons[1:]) == {f"`{reason.value}`": text for reason, text in DESCRIPTIONS.items()}


def test_the_readers_columns_are_index_columns():
    assert set(INDEX_COLUMNS + CROP_COLUMNS) <= set(INDEX_SCHEMA.names)


SAMPLES = [
    ("0a", {"txt": b"a caption", "jpg": b"\xff\xd8 pixels", "json": b'{"width": 3}'}),
    ("0b", {"txt": b"", "png": b"\x89PNG" * 200, "json": b"{}"}),
]


def test_tars_are_laid_out_as_webdatasets_writer_lays_them_out():
    ours, theirs = io.BytesIO(), io.BytesIO()
    write_tar(ours, SAMPLES)
    writer = wds.TarWriter(theirs, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER)
    for key, members in SAMPLES:
        writer.write({"__key__": key, **members})
    writer.close()
    assert ours.getvalue() == theirs.getvalue()


def test_member_offsets_are_those_a_tar_reader_finds_even_after_extended_headers():
    samples = [*SAMPLES, ("k" * 150, {"txt": b"a long name needs an extended header"})]
    stream = io.BytesIO()
    offsets = write_tar(stream, samples)
    stream.seek(0)
    with tarfile.open(fileobj=stream) as tar:
        assert offsets == {member.name: (member.offset_data, member.size) for member in tar}


def test_a_shards_part_points_at_its_members_and_is_committed_first(tmp_path):
    out = OutputDir(str(tmp_path))
    out.make_dirs()

    def part_of(offsets: dict[str, tuple[int, int]]) -> pa.Table:
        assert not out.list_names("shards", ".tar"), "the tar is renamed after its part"
        names = sorted(offsets)
        return pa.table(
            {
                "member": names,
                "offset": [offsets[name][0] for name in names],
                "size": [offsets[name][1] for name in names],
            }
        )

    out.write_shard(out.shard("s"), out.part("s"), SAMPLES, part_of)
    data = (tmp_path / "shards" / "s.tar").read_bytes()
    part = pq.read_table(out.part("s")).to_pylist()
    assert {row["member"]: data[row["offset"] : row["offset"] + row["size"]] for row in part} == {
        f"{key}.{extension}": content
        for key, members in SAMPLES
        for extension, content in members.items()
    }
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == [
        "s.parquet",
        "s.tar",
    ], "no temporaries left"


def test_a_vae_fingerprint_is_of_its_config_and_weights():
    torch = pytest.importorskip("torch")

    def module(seed: int, dtype=torch.float32, channels: int = 4):
        torch.manual_seed(seed)
        vae = torch.nn.Conv2d(3, channels, 1).to(dtype)
        vae.config = {"latent_channels": channels}  # what diffusers' models carry
        return vae

    fingerprint = vae_fingerprint(module(0))
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint) and vae_fingerprint(module(0)) == fingerprint
    others = [module(1), module(0, torch.bfloat16), module(0, channels=8)]
    assert len({fingerprint, *map(vae_fingerprint, others)}) == 4
