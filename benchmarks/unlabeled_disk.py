"""Disk per unlabeled case: the whole-volume region data_prepare used to write vs the boxes step's box region.

On a dataset prepared by data_prepare (e.g. synthetic `--size full`), runs the fine stage's boxes step
(`fine_efficient_seg.train.main`, step=boxes, the stage's config.yaml and its crop.max_extend_size_mm margin) into
`--out`, then prints per unlabeled case, in bytes:
- baseline: the canonical int16 whole-volume copy data_prepare wrote before (`region_image/<id>.npy`), written
  again here in this run (to a temporary folder, through `read_canonical_ct`, as data_prepare read it) and sized;
- now: the case's files in the dataset folder (its coarse array) and its box region under `--out`.
`--boxes truth` stands in for a trained coarse model (none ships with the repository): each case's box is the
organ union box of its hidden truth mask (synthetic datasets: `trainu_mask_hidden/`), stored as the model's box
before the step runs, so the step only cuts the regions; `--boxes body` runs the step without a model (the body
box: the largest region the step can store).

    PYTHONPATH=. .venv/bin/python -m benchmarks.unlabeled_disk --data DS --out OUT [--boxes truth|body]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common.config import FineTrainConfig
from common.core.files import save_npy_atomic
from common.core.typed_config import load_config
from common.storage.image_io import canonical_flips, read_canonical_ct, read_image, read_mask, to_canonical
from common.storage.lmdb_store import open_store
from common.volume.boxes import organ_bbox
from fine_efficient_seg.layout import RunLayout
from fine_efficient_seg.train import DEFAULT_CONFIG, main

MB = 1e6


def truth_boxes(data: Path, records: dict[str, dict]) -> dict[str, dict]:
    """{case: box record} from the hidden truth masks (canonical organ union box), as a coarse model's box."""
    out = {}
    for case_id, record in records.items():
        _, meta = read_image(record["image_path"])
        mask, _ = read_mask(data / "trainu_mask_hidden" / f"{case_id}.nii.gz", meta)
        box = organ_bbox(to_canonical(mask, canonical_flips(meta)))
        if box is None:
            raise SystemExit(f"{case_id}: empty truth mask")
        out[case_id] = {"coarse_box": [list(p) for p in box], "coarse_box_source": "coarse_model"}
    return out


def whole_volume_bytes(image_path: str, tmp: Path) -> int:
    """Size of the whole-volume int16 region data_prepare wrote before (written again here and measured)."""
    image, _, _ = read_canonical_ct(image_path)
    path = tmp / "whole.npy"
    save_npy_atomic(path, np.ascontiguousarray(image))
    size = path.stat().st_size
    path.unlink()
    return size


def dataset_bytes(data: Path, case_id: str) -> int:
    """Every file data_prepare wrote for the case (arrays named <id>.npy in the dataset's output folders)."""
    return sum(p.stat().st_size for p in data.rglob(f"{case_id}.npy"))


def main_cli() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.unlabeled_disk")
    p.add_argument("--data", required=True, help="a dataset folder prepared by data_prepare")
    p.add_argument("--out", required=True, help="the fine stage's output_dir for the boxes step")
    p.add_argument("--boxes", choices=("truth", "body"), default="truth")
    args = p.parse_args()
    data, out = Path(args.data).absolute(), Path(args.out).absolute()
    records = open_store(data / "db" / "seg_trainu").to_dict()
    if args.boxes == "truth":
        store = open_store(RunLayout(out).boxes_db, readonly=False)
        store.put_many(truth_boxes(data, records))
        store.close()
    cfg = load_config(FineTrainConfig, DEFAULT_CONFIG, [f"data_base_dir={data}", f"output_dir={out}", "device=cpu",
                                                        "boxes.coarse_model_dir=null", "step=boxes"])
    summary = main(cfg)["boxes"]
    boxes = open_store(RunLayout(out).boxes_db).to_dict()
    print(f"boxes step: {summary}; margin crop.max_extend_size_mm = {cfg.crop.max_extend_size_mm} mm")
    print("| unlabeled case | shape (z, y, x) | box region shape | before: coarse + whole-volume region (bytes) | "
          "after: dataset + box region (bytes) | after / before |")
    print("|---|---|---|---|---|---|")
    totals = [0, 0]
    with tempfile.TemporaryDirectory() as tmp:
        for case_id, record in sorted(records.items()):
            coarse = Path(record["coarse_image_path"]).stat().st_size
            before = coarse + whole_volume_bytes(record["image_path"], Path(tmp))
            region = Path(boxes[case_id]["region_path"]).stat().st_size
            after = dataset_bytes(data, case_id) + region
            totals[0] += before
            totals[1] += after
            shape = "x".join(str(v) for v in record["shape_zyx"])
            rshape = "x".join(str(v) for v in boxes[case_id]["region_shape_zyx"])
            print(f"| {case_id} | {shape} | {rshape} | {before:,} | {after:,} (region {region:,}) | "
                  f"{after / before:.3f} |")
    n = len(records)
    print(f"mean per unlabeled case: before {totals[0] / n / MB:.1f} MB, after {totals[1] / n / MB:.1f} MB "
          f"({args.boxes} boxes, {n} cases)")


if __name__ == "__main__":
    main_cli()
