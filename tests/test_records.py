"""common.storage.records: the prepared-case record and the fine boxes step's record, read and written by one class
each; records on disk load whatever version wrote them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_models import prepared_tiny_dataset

from common.core.errors import InputError
from common.storage.lmdb_store import open_store
from common.storage.records import CaseBox, PreparedCase, Region

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_refactor" / "records.json"


def test_records_written_before_the_restructure_round_trip_exactly():
    records = json.loads(FIXTURE.read_text())
    for kind, record in records.items():
        case = PreparedCase.from_json(record["case_id"], record, "db")
        assert case.to_json() == record, kind
        assert case.labeled == (kind == "labeled")
    labeled = PreparedCase.from_json("x", records["labeled"], "db")
    # one box form in memory: inclusive (min, max) per axis, whatever the stored form
    stored_crop = records["labeled"]["fine_crop_zyx"]
    assert labeled.fine_crop == tuple((start, stop - 1) for start, stop in stored_crop)
    assert labeled.organ_box == tuple(tuple(pair) for pair in records["labeled"]["organ_bbox"])
    assert labeled.crop_box == labeled.organ_box
    region = labeled.region
    assert region.offset_zyx == tuple(records["labeled"]["region_offset_zyx"])
    assert region.shape_zyx == tuple(records["labeled"]["region_shape_zyx"])
    unlabeled = PreparedCase.from_json("y", records["unlabeled"], "db")
    assert unlabeled.region is None and unlabeled.crop_box is None


def test_box_record_and_pool_record():
    region = Region.from_slices("/r/u.npy", None, (slice(2, 10), slice(0, 5), slice(3, 4)), 40.0)
    assert region.box == ((2, 9), (0, 4), (3, 3)) and region.shape_zyx == (8, 5, 1)
    box = CaseBox(((3, 8), (1, 4), (3, 3)), "coarse_model", region)
    stored = box.to_json()
    assert stored == {"coarse_box": [[3, 8], [1, 4], [3, 3]], "coarse_box_source": "coarse_model",
                      "region_path": "/r/u.npy", "region_offset_zyx": [2, 0, 3], "region_shape_zyx": [8, 5, 1],
                      "region_margin_mm": 40.0}
    assert CaseBox.from_json(stored) == box
    assert CaseBox.from_json({"region_path": "/r/u.npy"}) is None
    unlabeled = PreparedCase.from_json("y", json.loads(FIXTURE.read_text())["unlabeled"], "db")
    pooled = replace(unlabeled.with_box(box), uif_score=0.25, uif_rank=3)
    assert pooled.crop_box == box.coarse_box and pooled.region == region
    again = PreparedCase.from_json("y", pooled.to_json(), "pool")
    assert again == pooled and again.to_json() == pooled.to_json()
    assert pooled.to_json()["uif_rank"] == 3 and pooled.to_json()["coarse_box_source"] == "coarse_model"
    assert unlabeled.with_box(None) is unlabeled


def test_unknown_keys_are_kept_and_bad_records_name_the_database():
    record = {**json.loads(FIXTURE.read_text())["labeled"], "a_later_key": [1, 2]}
    assert PreparedCase.from_json("x", record, "db").to_json() == record
    with pytest.raises(InputError, match=r"db/seg_trainu: record 'bad' is not a prepared case"):
        PreparedCase.from_json("bad", {"spacing_zyx": "oops"}, "db/seg_trainu")
    with pytest.raises(InputError, match="not a prepared case"):
        PreparedCase.from_json("bad", {"organ_bbox": [[1, 0], [0, 1], [0, 1]]}, "db")  # hi < lo


def test_records_data_prepare_writes_round_trip(tmp_path):
    data = prepared_tiny_dataset(tmp_path, labeled=2, unlabeled=1, seed=4, hard_fraction=0.0)
    for db in ("seg_pre-process_database", "segu_pre-process_database", "seg_train_fold_1", "seg_trainu"):
        store = open_store(data / "db" / db)
        for key, record in store.items():
            assert PreparedCase.from_json(key, record, db).to_json() == record, (db, key)
        store.close()
