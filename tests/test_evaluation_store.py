"""Adversarial store, per-case log (resume after a kill) and sharding."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from robustseg.errors import ConfigError
from robustseg.evaluation.records import CaseLog, read_records, record_key
from robustseg.evaluation.shard import log_path, merge_shards, parse_shard, shard_cases, write_manifest
from robustseg.evaluation.store import AdversarialStore

KEY = ("unet", "pgd", "4/255", "case0")
PROV = {"source": "unet", "checkpoint_sha256": "abc", "attack": {"name": "pgd", "eps": 4 / 255}, "mode": "pipeline"}


def _affine() -> np.ndarray:
    return np.array([[0, 0, -1.5, 10], [0, 2.0, 0, -3], [0.8, 0, 0, 7], [0, 0, 0, 1]], dtype=np.float64)


def test_store_round_trip_keeps_affine_dtype_and_provenance(tmp_path):
    store = AdversarialStore(tmp_path)
    volume = torch.rand(1, 5, 6, 7)
    calls = []
    out = store.get_or_create(KEY, PROV, _affine(), lambda: calls.append(1) or volume)
    nii, meta = store.paths(*KEY)
    image = nib.load(str(nii))
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, _affine())
    provenance = json.loads(meta.read_text())
    assert provenance["attack"]["eps"] == pytest.approx(4 / 255) and provenance["checkpoint_sha256"] == "abc"
    again = store.get_or_create(KEY, PROV, _affine(), lambda: calls.append(1) or volume)
    assert len(calls) == 1 and torch.equal(out, again) and torch.equal(again, volume)
    assert store.stats() == {"generated": 1, "reused": 1, "regenerated": 0}


@pytest.mark.parametrize("damage", ["truncate", "delete_json", "other_checkpoint"])
def test_corrupt_or_stale_volume_is_regenerated(tmp_path, damage):
    store = AdversarialStore(tmp_path)
    volume = torch.rand(1, 4, 4, 4)
    store.get_or_create(KEY, PROV, np.eye(4), lambda: volume)
    nii, meta = store.paths(*KEY)
    if damage == "truncate":
        nii.write_bytes(nii.read_bytes()[:40])
    elif damage == "delete_json":
        meta.unlink()
    prov = {**PROV, "checkpoint_sha256": "def"} if damage == "other_checkpoint" else PROV
    fresh = torch.rand(1, 4, 4, 4)
    out = AdversarialStore(tmp_path).get_or_create(KEY, prov, np.eye(4), lambda: fresh)
    assert torch.equal(out, fresh)


def _rec(case: str, attack: str = "pgd", sid: str = "s1") -> dict:
    return {
        "source": "unet",
        "target": "unet",
        "attack": attack,
        "budget": "4/255",
        "case_id": case,
        "dice": 0.5,
        "settings_id": sid,
    }


IDENTITY = {"threat model": {"mode": "pipeline", "seed": 0}, "attacks": [{"preset": "pgd", "config": {"steps": 2}}]}


def test_resume_after_truncated_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    log = CaseLog(path)
    for i in range(4):
        log.append(_rec(f"c{i}"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])  # a kill mid-write leaves half a line
    resumed = CaseLog(path)
    assert len(resumed) == 3 and not resumed.done(record_key(_rec("c3")))
    resumed.append(_rec("c3"))
    records = read_records(path)
    assert [r["case_id"] for r in records] == ["c0", "c1", "c2", "c3"]


def test_shards_partition_cases_and_merge(tmp_path):
    cases = [f"case{i:02d}" for i in range(11)]
    parts = [shard_cases(cases, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(cases)
    for i, part in enumerate(parts):
        keys = [record_key(_rec(c)) for c in part]
        write_manifest(tmp_path, i, 3, part, keys)
        with pytest.raises(ConfigError, match="has not finished"):
            merge_shards(tmp_path, 3)  # a manifest without identities: the shard never finished
        write_manifest(tmp_path, i, 3, part, keys, settings_ids=["s1"] * len(keys), identity=IDENTITY)
        log = CaseLog(log_path(tmp_path, i, 3))
        log.append(_rec(part[0], sid="old"))  # a record of other settings stays on disk, never merged
        for c in part:
            log.append(_rec(c))
        log.append(_rec(part[0]))  # a duplicate line (rerun) must not duplicate the result
    merged = merge_shards(tmp_path, 3)
    assert sorted(r["case_id"] for r in merged) == cases
    assert {r["settings_id"] for r in merged} == {"s1"}
    # a lost record is detected
    path = log_path(tmp_path, 1, 3)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if parts[1][-1] not in line))
    with pytest.raises(ConfigError, match="missing"):
        merge_shards(tmp_path, 3)


def test_merge_refuses_shards_with_different_settings_naming_them(tmp_path):
    """Issue 9: shard 0 in pipeline mode with 2 PGD steps and shard 1 in tiles mode with 1 step must not merge."""
    other = {"threat model": {"mode": "tiles", "seed": 0}, "attacks": [{"preset": "pgd", "config": {"steps": 1}}]}
    for i, identity in enumerate((IDENTITY, other)):
        keys = [record_key(_rec(f"c{i}"))]
        write_manifest(tmp_path, i, 2, [f"c{i}"], keys, settings_ids=["s1"], identity=identity)
        CaseLog(log_path(tmp_path, i, 2)).append(_rec(f"c{i}"))
    with pytest.raises(ConfigError, match="other settings") as err:
        merge_shards(tmp_path, 2)
    assert "threat model.mode" in str(err.value) and '"tiles"' in str(err.value) and "steps" in str(err.value)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ["4/4", "x", "0/0"]:
        with pytest.raises(ConfigError):
            parse_shard(bad)
