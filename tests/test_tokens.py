"""The token-shard format: versioned, written whole, unknown versions refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vqtrain.tokens import FORMAT_VERSION, load_shard, save_shard

SHARD = {
    "meta": {"split": "test"},
    "ids": ["a.wav"],
    "index": [0],
    "tokens": [torch.arange(3)],
    "lengths": [96],
    "skipped": [],
}


def test_a_saved_shard_carries_the_format_version_and_reads_back(tmp_path: Path):
    save_shard(tmp_path / "shard-00000.pt", SHARD)
    shard = load_shard(tmp_path / "shard-00000.pt")
    assert shard["format_version"] == FORMAT_VERSION
    assert shard["ids"] == SHARD["ids"] and torch.equal(shard["tokens"][0], SHARD["tokens"][0])
    assert [path.name for path in tmp_path.iterdir()] == ["shard-00000.pt"]  # no temporary file left


def test_an_unversioned_shard_of_earlier_releases_reads_as_version_0(tmp_path: Path):
    torch.save(SHARD, tmp_path / "old.pt")
    assert load_shard(tmp_path / "old.pt")["ids"] == SHARD["ids"]


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "1", None])
def test_an_unknown_version_is_refused_naming_it(tmp_path: Path, version):
    torch.save({**SHARD, "format_version": version}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=rf"new.pt: token shard format version {version!r} is not one"):
        load_shard(tmp_path / "new.pt")
