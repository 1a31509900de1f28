"""The config schema of every stage: dataclasses whose fields hold the defaults and the checks (style.md).

Each stage's `config.yaml` holds the values, `key=value` arguments override them (`common.core.typed_config` reads,
checks and saves them). The vocabularies come from where they are defined: network names from
`common.networks.NETWORKS`, losses from `common.train.losses.LOSSES`, UIF scores from
`common.evaluation.uncertainty`, precisions from `common.core.amp`, the default values from `common.core.defaults`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from common.core.amp import PRECISIONS
from common.core.defaults import (
    COARSE_MIN_VOLUME_MM3,
    COARSE_SIZE_ZYX,
    EXTEND_SIZE_MM,
    FINE_MIN_VOLUME_MM3,
    FINE_SIZE_ZYX,
    HU_LIMITS,
    HU_WINDOW,
    MAX_BATCH_SIZE,
    MAX_CHANNELS,
    MAX_EXTEND_SIZE_MM,
    MAX_ITERATIONS,
    MAX_MARGIN_MM,
    MAX_SEED,
    MAX_VOLUME_MM3,
    MAX_WORKERS,
    MAX_Z_WINDOW_MM,
    Z_WINDOW_MM,
)
from common.core.device import device_problem
from common.core.labels import DEFAULT_NSD_TOLERANCE_MM
from common.core.typed_config import cfg_field, choice_field, path_field, section
from common.evaluation.uncertainty import UIF_SCORES, WEIGHTINGS
from common.networks import MAX_INPUT_SIZE, NETWORKS, input_size_problem
from common.storage.model_folder import PreprocessSpec
from common.train.losses import LOSSES

KEEP_SCHEDULES = ("fixed", "growing")
MAX_UIF_ROUNDS = 20


def uif_step(k: int) -> str:
    """Name of the fine stage's step that runs filter k: uif, uif2, uif3, ..."""
    return "uif" if k == 1 else f"uif{k}"


# ------------------------------------------------------------------------------------------------- checks
def _window_problems(name: str, window: list[float]) -> Iterable[tuple[str, str]]:
    if len(window) == 2 and not window[0] < window[1]:
        yield name, f"lower bound must be below upper bound, got {window}"


def _extend_problems(extend_mm: float, max_extend_mm: float) -> Iterable[tuple[str, str]]:
    if extend_mm > max_extend_mm:
        yield "max_extend_size_mm", f"must be >= extend_size_mm ({extend_mm}), got {max_extend_mm}"


# ------------------------------------------------------------------------------------------------- schemas
@dataclass
class NnUNetSection:
    """Reading an nnU-Net v2 raw dataset (data_base_dir holds a dataset.json): where its unlabeled CTs are (nnU-Net
    has no such folder), and the NSD tolerance of a label FLARE22 does not know."""

    unlabeled_dir: str = "imagesUnlabeled"
    default_nsd_tolerance_mm: float = cfg_field(DEFAULT_NSD_TOLERANCE_MM, gt=0)


@dataclass
class PrepareConfig:
    """data_prepare: read, validate, canonicalise, resize and store the dataset (paths under data_base_dir)."""

    data_base_dir: str = path_field("../dataset")
    train_image_dir: str = "train_images"
    train_mask_dir: str = "train_mask"
    trainu_image_dir: str = "trainu_images"
    test_image_dir: str = "val_images"
    test_mask_dir: str | None = None
    file_list_dir: str = "file_list"
    coarse_size_zyx: list[int] = cfg_field(list(COARSE_SIZE_ZYX), length=3, gt=0, le=MAX_INPUT_SIZE, multiple_of=16)
    fine_size_zyx: list[int] = cfg_field(list(FINE_SIZE_ZYX), length=3, gt=0, le=MAX_INPUT_SIZE, multiple_of=16)
    extend_size_mm: float = cfg_field(EXTEND_SIZE_MM, ge=0, le=MAX_MARGIN_MM)
    max_extend_size_mm: float = cfg_field(MAX_EXTEND_SIZE_MM, ge=0, le=MAX_MARGIN_MM)
    hu_window: list[float] = cfg_field(list(HU_WINDOW), length=2, ge=HU_LIMITS[0], le=HU_LIMITS[1])
    val_ratio: float = cfg_field(0.2, ge=0, lt=1)
    split_seed: int = cfg_field(0, ge=0, le=MAX_SEED)
    split_5fold: bool = False
    num_workers: int = cfg_field(2, ge=0, le=MAX_WORKERS)
    overwrite: bool = False
    nnunet: NnUNetSection = section(NnUNetSection)

    def _cross_check(self) -> Iterable[tuple[str, str]]:
        yield from _window_problems("hu_window", self.hu_window)
        yield from _extend_problems(self.extend_size_mm, self.max_extend_size_mm)


@dataclass
class DataSection:
    """Databases (relative to data_base_dir, `{fold}` filled in by the stage), input size and loaders."""

    labeled_db: str = "db/seg_train_fold_{fold}"
    unlabeled_db: str | None = "db/seg_trainu"
    val_db: str = "db/seg_val_fold_{fold}"
    size_zyx: list[int] = cfg_field(list(COARSE_SIZE_ZYX), length=3, gt=0, multiple_of=16)
    hu_window: list[float] = cfg_field(list(HU_WINDOW), length=2, ge=HU_LIMITS[0], le=HU_LIMITS[1])
    labeled_batch_size: int = cfg_field(1, ge=1, le=MAX_BATCH_SIZE)
    unlabeled_batch_size: int = cfg_field(1, ge=1, le=MAX_BATCH_SIZE)
    num_workers: int = cfg_field(2, ge=0, le=MAX_WORKERS)

    def _cross_check(self) -> Iterable[tuple[str, str]]:
        yield from _window_problems("hu_window", self.hu_window)
        problem = input_size_problem(self.size_zyx)
        if problem is not None:
            yield "size_zyx", problem


@dataclass
class ModelSection:
    """Network architecture (built by name from common.networks) and the two CPS networks' seeds."""

    name: str = choice_field("unet", tuple(NETWORKS))
    channels: list[int] = cfg_field([16, 32, 64, 128, 256], length=5, gt=0, le=MAX_CHANNELS)
    dropout: float = cfg_field(0.2, ge=0, lt=1)
    seed_a: int = cfg_field(1, ge=0, le=MAX_SEED)
    seed_b: int = cfg_field(2, ge=0, le=MAX_SEED)
    # Weights networks A and B start from (a fresh run only): an exported model folder or model.pt, or the
    # original release's stage folder or best_model.pt (common.storage.weights.read_weight_pair); null = random init.
    init_from: str | None = path_field(None)

    def _cross_check(self) -> Iterable[tuple[str, str]]:
        if self.seed_a == self.seed_b:
            yield "seed_b", f"must differ from seed_a ({self.seed_a}): the two CPS networks need different seeds"


@dataclass
class OptimSection:
    """Adam settings."""

    lr: float = cfg_field(1.0e-2, gt=0, le=10)
    betas: list[float] = cfg_field([0.9, 0.99], length=2, ge=0, lt=1)
    weight_decay: float = cfg_field(5.0e-5, ge=0, le=10)


@dataclass
class ScheduleSection:
    """Iteration-based schedule: LR multiplied by lr_drop_factor[i] after lr_drop_at[i] of the iterations."""

    iterations: int = cfg_field(20000, ge=1, le=MAX_ITERATIONS)
    lr_drop_at: list[float] = cfg_field([0.66, 0.86], gt=0, lt=1)
    lr_drop_factor: list[float] = cfg_field([0.1, 0.05], gt=0, le=10)
    val_interval: int = cfg_field(500, ge=1)
    checkpoint_interval: int = cfg_field(100, ge=1)
    log_interval: int = cfg_field(10, ge=1)

    def _cross_check(self) -> Iterable[tuple[str, str]]:
        if len(self.lr_drop_factor) != len(self.lr_drop_at):
            yield "lr_drop_factor", (f"needs one factor per lr_drop_at entry ({len(self.lr_drop_at)}), "
                                     f"got {len(self.lr_drop_factor)}")
        if any(b <= a for a, b in zip(self.lr_drop_at, self.lr_drop_at[1:])):
            yield "lr_drop_at", f"must be strictly increasing, got {self.lr_drop_at}"


@dataclass
class LossSection:
    """Supervised loss (common.train.losses.build_loss)."""

    name: str = choice_field("dice_focal", tuple(LOSSES))


@dataclass
class CPSSection:
    """Cross pseudo supervision: the weight of its loss and its sigmoid ramp-up (0 = no ramp-up), which pseudo-label
    voxels count (`confidence`), how the loss spans a labeled + unlabeled batch (`parts`), the ablation flag
    (common.train.cps.CPSSettings)."""

    weight: float = cfg_field(1.0, ge=0, le=1000)
    rampup_iterations: int = cfg_field(0, ge=0, le=MAX_ITERATIONS)
    confidence: float = cfg_field(0.0, ge=0, lt=1)
    parts: str = choice_field("joint", ("joint", "separate"))
    legacy_shift: bool = False  # ablation: the original release's shifted pseudo labels (see common/train/cps.py)

    def _cross_check(self) -> Iterable[tuple[str, str]]:
        if 0.0 < self.confidence <= 0.5:
            yield "confidence", (f"must be 0 (every voxel) or above 0.5 (a sure organ or background), got "
                                 f"{self.confidence}")


@dataclass
class AmpSection:
    """Mixed precision (torch.autocast) and torch.compile."""

    precision: str = choice_field("bf16", PRECISIONS)
    compile: bool = False


@dataclass
class ExportSection:
    """Which network is the exported primary and where the model folder goes."""

    network: str = choice_field("a", ("a", "b"))
    dir: str = path_field("../model_weights/base_coarse_model")


@dataclass
class FineExportSection(ExportSection):
    """The export section of the fine stage, which can also export an earlier round than the last."""

    dir: str = path_field("../model_weights/efficient_fine_model")
    round: int | None = cfg_field(None, ge=1, le=MAX_UIF_ROUNDS + 1)  # null: the last round of the run


@dataclass
class CropSection:
    """Fine-stage training crops: box extension and per-organ HU shift augmentation."""

    extend_size_mm: float = cfg_field(EXTEND_SIZE_MM, ge=0, le=MAX_MARGIN_MM)
    max_extend_size_mm: float = cfg_field(MAX_EXTEND_SIZE_MM, ge=0, le=MAX_MARGIN_MM)
    random_extend_prob: float = cfg_field(0.5, ge=0, le=1)
    hu_shift_prob: float = cfg_field(0.5, ge=0, le=1)
    hu_shift_max: float = cfg_field(200.0, ge=0, le=HU_LIMITS[1])

    def _cross_check(self) -> Iterable[tuple[str, str]]:
        yield from _extend_problems(self.extend_size_mm, self.max_extend_size_mm)


@dataclass
class BoxesSection:
    """Coarse model used to find the organ boxes of unlabeled cases (null: body box, with a warning)."""

    coarse_model_dir: str | None = path_field("../model_weights/base_coarse_model")


@dataclass
class UIFSection:
    """Uncertainty-based image filtering: score, and how many unlabeled cases to keep (count wins over ratio)."""

    score: str = choice_field("disagreement", UIF_SCORES)
    keep_count: int | None = cfg_field(None, ge=1, le=MAX_ITERATIONS)
    keep_ratio: float = cfg_field(0.1, gt=0, le=1)
    weighting: str = choice_field("organ", WEIGHTINGS)
    snapshots: int = cfg_field(3, ge=0, le=100)
    # filter-and-retrain cycles after round 1: filter k scores the whole unlabeled pool with round k's networks and
    # round k + 1 trains on what it keeps (1 = the original method: one filter, then round 2)
    rounds: int = cfg_field(1, ge=1, le=MAX_UIF_ROUNDS)
    # fixed: every filter keeps keep_count (or keep_ratio); growing: filter k keeps k times as many (at most all)
    keep_schedule: str = choice_field("fixed", KEEP_SCHEDULES)

    def keep(self, k: int) -> tuple[int | None, float]:
        """(keep_count, keep_ratio) of filter k under the keep schedule."""
        growth = k if self.keep_schedule == "growing" else 1
        return (None if self.keep_count is None else self.keep_count * growth), min(1.0, self.keep_ratio * growth)


@dataclass
class Round2Section:
    """The CPS rounds on a filtered pool (round 2 and every later one): warm-started networks (the previous round's
    best; measured better, BENCHMARKS.md) or fresh ones (as round 1 began, the original's); null iterations =
    schedule's."""

    init: str = choice_field("warm", ("warm", "fresh"))
    iterations: int | None = cfg_field(None, ge=1, le=MAX_ITERATIONS)


@dataclass
class CoarsePostprocessSection:
    """Coarse prediction -> organ box (reference 6.2 steps 3-4); exported with the model, predict.py flags
    --coarse-min-volume-mm3 / --z-window-mm override it. The fine stage's boxes step uses the same values."""

    min_volume_mm3: float = cfg_field(COARSE_MIN_VOLUME_MM3, ge=0, le=MAX_VOLUME_MM3)
    z_window_mm: float = cfg_field(Z_WINDOW_MM, ge=1, le=MAX_Z_WINDOW_MM)


@dataclass
class FinePostprocessSection:
    """Fine prediction -> mask (reference 6.2 step 7): smallest component kept per organ (mm^3 of the crop grid);
    exported with the model, predict.py --fine-min-volume-mm3 overrides it. The box margin is crop.extend_size_mm."""

    min_volume_mm3: float = cfg_field(FINE_MIN_VOLUME_MM3, ge=0, le=MAX_VOLUME_MM3)


@dataclass
class TrainConfigBase:
    """What both CPS training stages share (the shared engine reads these); each stage changes some defaults and
    adds its own sections."""

    data_base_dir: str = path_field("../dataset")
    output_dir: str = path_field("output")
    fold: int = cfg_field(1, ge=1, le=5)
    device: str = cfg_field("auto", check=device_problem)
    seed: int = cfg_field(0, ge=0, le=MAX_SEED)
    data: DataSection = section(DataSection)
    model: ModelSection = section(ModelSection)
    optim: OptimSection = section(OptimSection)
    schedule: ScheduleSection = section(ScheduleSection)
    loss: LossSection = section(LossSection)
    cps: CPSSection = section(CPSSection)
    amp: AmpSection = section(AmpSection)

    def run_identity(self, stage: str) -> dict[str, Any]:
        """What makes two runs of a stage different experiments (common.storage.step_marker.claim_run_folder)."""
        return {"stage": stage, "fold": self.fold, "data_base_dir": str(Path(self.data_base_dir).resolve()),
                "labeled_db": self.data.labeled_db.format(fold=self.fold),
                "val_db": self.data.val_db.format(fold=self.fold)}


@dataclass
class CoarseTrainConfig(TrainConfigBase):
    """coarse_base_seg: CPS training of two residual U-Nets on 160^3 whole volumes, then export."""

    postprocess: CoarsePostprocessSection = section(CoarsePostprocessSection)
    step: str = choice_field("train", ("train", "export"))
    export: ExportSection = section(ExportSection)

    def preprocess_spec(self, trained: Mapping[str, Any]) -> PreprocessSpec:
        """The exported model's preprocessing: input size and HU window as `trained` (the run's saved config),
        post-processing as this config (a prediction setting: changing it needs no retraining)."""
        return PreprocessSpec("coarse", trained["data"]["size_zyx"], trained["data"]["hu_window"],
                              self.postprocess.min_volume_mm3, z_window_mm=self.postprocess.z_window_mm)


@dataclass
class FineTrainConfig(TrainConfigBase):
    """fine_efficient_seg: boxes, CPS round 1, then uif.rounds times a UIF filter and a CPS round on what it kept,
    and export of two EfficientSegNets on 192^3 crops."""

    data: DataSection = section(DataSection, size_zyx=list(FINE_SIZE_ZYX))
    model: ModelSection = section(ModelSection, name="efficient_seg_net")
    optim: OptimSection = section(OptimSection, lr=1.0e-3)
    schedule: ScheduleSection = section(ScheduleSection, iterations=40000)
    loss: LossSection = section(LossSection, name="dice_bce")
    crop: CropSection = section(CropSection)
    boxes: BoxesSection = section(BoxesSection)
    uif: UIFSection = section(UIFSection)
    round2: Round2Section = section(Round2Section)
    postprocess: FinePostprocessSection = section(FinePostprocessSection)
    step: str = cfg_field("all")  # all, or one of steps()
    export: FineExportSection = section(FineExportSection)

    def steps(self) -> tuple[str, ...]:
        """The steps in the order `step=all` runs them: boxes, round1, then a filter and a round per uif.rounds
        (uif + round2, uif2 + round3, ...), export."""
        steps = ["boxes", "round1"]
        for k in range(1, self.uif.rounds + 1):
            steps += [uif_step(k), f"round{k + 1}"]
        return (*steps, "export")

    def _cross_check(self) -> Iterable[tuple[str, str]]:
        if self.step != "all" and self.step not in self.steps():
            yield "step", (f"{self.step!r} is not a step of this run; expected 'all' or one of "
                           f"{', '.join(map(repr, self.steps()))} (uif.rounds={self.uif.rounds})")
        if self.export.round is not None and self.export.round > 1 + self.uif.rounds:
            yield "export.round", (f"round {self.export.round} is not a round of this run: it has rounds 1.."
                                   f"{1 + self.uif.rounds} (uif.rounds={self.uif.rounds})")

    def preprocess_spec(self, trained: Mapping[str, Any]) -> PreprocessSpec:
        """The exported model's preprocessing: input size, HU window and box margin as `trained` (the round's saved
        config), the smallest component kept as this config (a prediction setting: changing it needs no retraining)."""
        return PreprocessSpec("fine", trained["data"]["size_zyx"], trained["data"]["hu_window"],
                              self.postprocess.min_volume_mm3, extend_size_mm=trained["crop"]["extend_size_mm"])


