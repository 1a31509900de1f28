"""Two-stage prediction of one CT: coarse network on the whole volume -> organ box -> fine network on the crop.

Pipeline per case (DESIGN 4, decisions 7-9; reference 6.2):
1. read (background thread), check the volume looks like a CT;
2. the raw HU volume goes to the device once, as it is stored (int16/int32); the coarse input is resized,
   windowed and z-scored there (`prepare_input`) and flipped to the canonical orientation at 160^3;
3. coarse labels (`probs_to_labels`: highest sigmoid >= 0.5 wins), organ box (`organ_box`: largest
   26-connected component per organ >= 1000 mm^3 of the coarse grid, 240 mm z-window around the largest region)
   -> raw crop with a 20 mm margin by the training crop rule (`crop_box_with_margin`); an empty coarse mask
   falls back to the whole volume;
4. the fine network runs on the crop resized to 192^3 (or 160^3); its scores are resized back to the crop size
   on the device, chunk by chunk and only inside each organ's support, straight into a uint8 label map
   (no full-resolution 13-channel float tensor ever exists);
5. largest component per organ >= 500 mm^3 of the crop grid (FINE_MIN_VOLUME_MM3), on each organ's bounding box;
6. paste into a zero uint8 volume in the file's own orientation and write it (background thread) with the
   input's exact size, spacing, origin and direction.

All large arrays stay in the file's orientation: only network-grid tensors are flipped (a corner-aligned resize
commutes with a flip), so no full-volume flip copy is made.

`--ensemble` averages the sigmoid probabilities of networks A and B in both stages. The uncertainty score is the
disagreement of A and B on the fine grid, by UIF's definition (`common.evaluation.uncertainty.labels_disagreement`: 1 -
mean per-organ Dice of their hard masks over the organs present in either; 1.0 when neither finds an organ; DESIGN 5.6).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from common.core import gpu_memory
from common.core.amp import PRECISIONS as TRAIN_PRECISIONS
from common.core.amp import amp_settings, autocast
from common.core.defaults import MAX_MARGIN_MM, MAX_VOLUME_MM3, MAX_WORKERS, MAX_Z_WINDOW_MM
from common.core.device import resolve_device, set_cudnn_benchmark
from common.core.errors import InputError, WeightsError
from common.core.labelmaps import LOGIT_THRESHOLD, probs_to_labels
from common.core.labels import LabelSet
from common.core.logger import get_logger
from common.evaluation.uncertainty import labels_disagreement
from common.infer.backends import Forward, make_forwards, resolve_backend
from common.infer.postprocess import coarse_organ_box, keep_largest_component
from common.infer.upsample import default_chunk_elements, upsample_labels
from common.networks import input_size_problem
from common.storage.image_io import ImageMeta, canonical_flips
from common.storage.model_folder import COARSE_DIR, FINE_DIR, PreprocessSpec
from common.storage.weights import load_model
from common.volume.boxes import canonical_to_file_slices, crop_box_with_margin
from common.volume.network_input import prepare_input

logger = get_logger(__name__)

DEFAULT_UNCERTAINTY_THRESHOLD = 0.2
PRECISIONS = ("auto",) + TRAIN_PRECISIONS  # the training vocabulary (common.core.amp) plus auto = by device


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> fp16 on CUDA, fp32 on CPU; fp16/bf16 on CPU fall back to fp32 (slower there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            logger.info("precision %s is not used on the CPU; running fp32", precision)
        return "fp32"
    return "fp16" if precision == "auto" else precision


def _flip(t: torch.Tensor, flips: Sequence[bool]) -> torch.Tensor:
    """Flip the last three axes (z, y, x) of `t` where `flips` says so (no copy when nothing flips)."""
    dims = [t.ndim - 3 + i for i, f in enumerate(flips) if f]
    return torch.flip(t, dims) if dims else t



@dataclass
class Stage:
    """One exported stage ready for prediction."""

    name: str
    path: Path
    networks: dict[str, Forward]  # name -> x (1, 1, *size_zyx) -> logits (1, C, ...), on the predictor's backend
    primary: str
    preprocess: PreprocessSpec    # the model's, with predict.sh's overrides applied
    labels: LabelSet              # what the networks segment (one output channel per label)
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the torch networks behind `networks`

    @property
    def size_zyx(self) -> tuple[int, int, int]:
        return self.preprocess.size_zyx

    @property
    def hu_window(self) -> tuple[float, float]:
        return self.preprocess.hu_window


def load_stage(model_dir: Path, stage: str, device: torch.device,
               overrides: Mapping[str, Any] | None = None) -> Stage:
    """Load a stage's model folder (exported, or the original release's, converted in memory) with its
    preprocessing, `overrides` (keys of PreprocessSpec; None values keep the model's) applied; WeightsError naming
    the file on any problem."""
    try:
        exported = load_model(model_dir, stage, device)
    except InputError as e:
        raise WeightsError(str(e)) from None
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise WeightsError(f"{model_dir / 'model.pt'}: cannot build the {stage} network: {e}") from None
    chosen = {k: v for k, v in (overrides or {}).items() if v is not None}
    return Stage(stage, Path(model_dir), dict(exported.networks), exported.primary,
                 dataclasses.replace(exported.preprocess, **chosen), exported.labels)


@dataclass
class CaseResult:
    """What `Predictor.predict` returns for one volume."""

    mask: np.ndarray                       # (z, y, x) uint8 in the file's orientation
    crop: tuple[slice, slice, slice]       # fine crop, canonical coordinates
    fallback: bool                         # coarse mask was empty: the whole volume was used
    uncertainty: float | None
    times: dict[str, float] = field(default_factory=dict)  # coarse_s, fine_s, post_s
    gpu: gpu_memory.GpuMemory = field(default_factory=gpu_memory.GpuMemory)  # peaks over both stages (zeros: CPU)
    device: str = "cpu"


# The numeric options' inclusive ranges (None: the model's value), the one rule for PredictOptions and predict.py's
# flags (`--extend-size-mm` is option extend_size_mm); the bounds are the configs' (common.core.defaults).
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "workers": (1, MAX_WORKERS),
    "uncertainty_threshold": (0.0, 1.0),  # the uncertainty is 1 - a mean Dice
    "z_window_mm": (1.0, MAX_Z_WINDOW_MM),
    "coarse_min_volume_mm3": (0.0, MAX_VOLUME_MM3),
    "extend_size_mm": (0.0, MAX_MARGIN_MM),
    "fine_min_volume_mm3": (0.0, MAX_VOLUME_MM3),
    "chunk_elements": (1, float("inf")),
}


def option_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for the option `name` (a key of OPTION_RANGES, or fine_size), or None."""
    if value is None:
        return None
    if name == "fine_size":
        return input_size_problem((int(value),) * 3) if float(value) == int(value) else f"not an integer: {value}"
    low, high = OPTION_RANGES[name]
    if not math.isfinite(float(value)) and not (high == float("inf") and float(value) == high):
        return f"must be a finite number, got {value}"
    if not low <= float(value) <= high:
        return f"must be between {low:g} and {high:g}, got {value}"
    return None


@dataclass(frozen=True)
class PredictOptions:
    """Every option of a prediction run, in one place: predict.py fills it, `predict_folder` and `Predictor` read it.

    Network options (weights_dir .. chunk_elements) are used by `Predictor`; folder options (overwrite ..
    progress) by `predict_folder`.
    """

    weights_dir: str | os.PathLike = "model_weights"  # folder with base_coarse_model/ and efficient_fine_model/
    device: str | torch.device = "auto"                # auto = cuda if available, else cpu
    precision: str = "auto"                            # one of PRECISIONS; auto = fp16 on CUDA, fp32 on CPU
    fine_size: int | None = None                       # fine input size per axis (multiple of 16); None = model's
    ensemble: bool = False                             # average networks A and B in both stages
    uncertainty: str = "auto"                          # auto / on / off: A/B disagreement score
    # Post-processing (reference 6.2 steps 3-7); None = the value the exported model carries (its training
    # config's postprocess section), or common.infer.postprocess's default for an older export.
    z_window_mm: float | None = None                   # coarse box: half height of the z-window
    coarse_min_volume_mm3: float | None = None         # smallest coarse component kept (mm^3, coarse grid)
    extend_size_mm: float | None = None                # margin around the organ box (mm)
    fine_min_volume_mm3: float | None = None           # smallest fine component kept (mm^3, crop grid)
    chunk_elements: int | None = None                  # elements per resize chunk; None = by device
    cudnn_benchmark: bool = True                       # let cuDNN pick the fastest kernels (fixed input sizes)
    backend: str = "auto"                              # common.infer.backends.BACKENDS; auto = fastest installed
    overwrite: bool = False                            # redo cases whose output exists
    overlays: bool = False                             # also write <id>_overlay.png
    workers: int = 2                                   # background reader threads = cases read ahead
    uncertainty_threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD  # flag cases above it
    progress: bool = True                              # tqdm progress bar

    def __post_init__(self) -> None:
        """ValueError naming the first option out of its range (OPTION_RANGES, the input-size rule)."""
        for name in ("fine_size", *OPTION_RANGES):
            problem = option_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"{name}: {problem}")
        if self.uncertainty not in ("auto", "on", "off"):
            raise ValueError(f"uncertainty must be auto, on or off, got {self.uncertainty!r}")


class Predictor:
    """Coarse + fine networks on one device, set up from the network fields of a `PredictOptions`."""

    def __init__(self, options: PredictOptions | None = None) -> None:
        options = options if options is not None else PredictOptions()
        self.options = options
        self.weights_dir = Path(options.weights_dir)
        device, fine_size, ensemble, uncertainty = (options.device, options.fine_size, options.ensemble,
                                                    options.uncertainty)
        self.device = resolve_device(device)
        self.backend = resolve_backend(options.backend, self.device)
        # Fixed network input sizes: cuDNN times its algorithms once per shape and keeps the fastest, as in
        # training. Its workspace counts in total - free; gpu_check measures gpu_used_mb with it on and off.
        set_cudnn_benchmark(self.device, options.cudnn_benchmark)
        self.precision = resolve_precision(options.precision, self.device)
        self.amp = amp_settings(self.precision, self.device)
        # Scores are resized in fp16 on the GPU (half the memory); bf16's 8-bit mantissa is too coarse for the
        # channel comparisons at organ borders, so bf16 networks hand fp32 scores on.
        self.score_dtype = torch.float16 if self.amp.dtype == torch.float16 else torch.float32
        fine_size_zyx = None if fine_size is None else (int(fine_size),) * 3  # checked by PredictOptions
        self.ensemble = ensemble
        self.chunk_elements = options.chunk_elements or default_chunk_elements(self.device)
        self.coarse = load_stage(self.weights_dir / COARSE_DIR, "coarse", self.device, {
            "min_volume_mm3": options.coarse_min_volume_mm3, "z_window_mm": options.z_window_mm})
        self.fine = load_stage(self.weights_dir / FINE_DIR, "fine", self.device, {
            "size_zyx": fine_size_zyx, "min_volume_mm3": options.fine_min_volume_mm3,
            "extend_size_mm": options.extend_size_mm})
        self.labels = _same_labels(self.coarse, self.fine)
        self.all_components = frozenset(label.id for label in self.labels if not label.keep_largest)
        for stage in (self.coarse, self.fine):
            stage.modules = dict(stage.networks)
            stage.networks = make_forwards(self.backend, stage.modules, stage.path, stage.size_zyx)
        if ensemble:
            for stage in (self.coarse, self.fine):
                if len(stage.networks) < 2:
                    raise WeightsError(
                        f"{stage.path}: --ensemble needs networks a and b, this {stage.name} model holds "
                        f"only network {stage.primary} (the original release's fine stage saved network A only); "
                        "predict without --ensemble")
        both = len(self.fine.networks) >= 2
        if uncertainty == "on" and not both:
            logger.warning("uncertainty needs networks a and b in %s; not computed", self.fine.path / "model.pt")
        # auto: free with --ensemble; on a GPU one more fine forward (~0.1 s); on a CPU it would double the fine
        # stage, so it is left to "on" there.
        self.uncertainty = both and (uncertainty == "on" or (uncertainty == "auto" and (
            ensemble or self.device.type == "cuda")))

    def on_cpu(self) -> "Predictor":
        """The same predictor on the CPU (fp32), for cases that do not fit in GPU memory."""
        return Predictor(dataclasses.replace(self.options, device="cpu", precision="fp32",
                                             uncertainty="on" if self.uncertainty else "off"))

    # -------------------------------------------------------------------------------------------- stages

    def _scores(self, stage: Stage, x: torch.Tensor, want_pair: bool
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Logit scores (C, D, H, W) for input x (1, 1, D, H, W) (labels: LOGIT_THRESHOLD); A/B label maps if
        asked."""
        names = ["a", "b"] if "a" in stage.networks and "b" in stage.networks else [stage.primary]
        use = names if self.ensemble else [stage.primary]
        run = names if (want_pair and len(names) == 2) else use
        outputs: dict[str, torch.Tensor] = {}
        with autocast(self.amp):
            for name in run:
                outputs[name] = stage.networks[name](x)[0].to(self.score_dtype)
        pair = None
        if want_pair and len(names) == 2:
            pair = (probs_to_labels(outputs["a"], LOGIT_THRESHOLD), probs_to_labels(outputs["b"], LOGIT_THRESHOLD))
        if len(use) == 1:
            return outputs[use[0]], pair
        # Average the probabilities (fp32), then back to logits: the ensemble's score map is resized as logits,
        # like a single network's, and equals it when A and B agree.
        probs = outputs.pop(use[0]).float().sigmoid_()
        for name in use[1:]:
            probs.add_(outputs.pop(name).float().sigmoid_())
        probs.div_(len(use)).clamp_(1e-7, 1 - 1e-7)
        return torch.logit(probs).to(self.score_dtype), pair

    @torch.inference_mode()
    def predict(self, raw_zyx: np.ndarray, meta: ImageMeta, case: str = "") -> CaseResult:
        """Segment one volume given in the file's array order; returns the uint8 mask in the same order.

        `raw_zyx` may be a view of page-locked memory (`pinned_copy`): its upload is then asynchronous.
        GPU memory is read at the end of each stage, while its tensors are still alive (`common.core.gpu_memory`).
        """
        gpu_memory.reset_peak(self.device)
        times: dict[str, float] = {}
        shape = tuple(int(s) for s in raw_zyx.shape)
        spacing = np.asarray(meta.spacing_zyx, dtype=np.float64)
        flips = canonical_flips(meta)
        t0 = time.perf_counter()

        # ---- coarse: whole volume, resized on the device (slab by slab), flipped at network size
        raw = torch.from_numpy(_torch_friendly(raw_zyx)).to(self.device, non_blocking=True)
        x = _flip(prepare_input(raw[None, None], self.coarse.size_zyx, self.coarse.hu_window), flips)
        scores, _ = self._scores(self.coarse, x, want_pair=False)
        del x
        coarse_labels = probs_to_labels(scores, LOGIT_THRESHOLD).cpu().numpy()
        memory = gpu_memory.snapshot(self.device)
        del scores
        t1 = time.perf_counter()
        times["coarse_s"] = t1 - t0

        box, fallback = coarse_organ_box(coarse_labels, shape, tuple(spacing), self.coarse.preprocess)
        if fallback:
            logger.warning("%s: coarse mask is empty; the fine network runs on the whole volume", case or "case")
        crop = crop_box_with_margin(box, tuple(spacing), self.fine.preprocess.extend_size_mm, shape)
        file_crop = canonical_to_file_slices(crop, flips, shape)
        t2 = time.perf_counter()
        times["post_s"] = t2 - t1

        # ---- fine: crop (a view of the device volume), network at 192^3, labels resized back on the device
        region = raw[file_crop]
        crop_shape = tuple(region.shape)
        x = _flip(prepare_input(region[None, None], self.fine.size_zyx, self.fine.hu_window), flips)
        del raw, region
        scores, pair = self._scores(self.fine, x, want_pair=self.uncertainty)
        del x
        uncertainty = labels_disagreement(*pair, self.labels.num_organs) if pair is not None else None
        del pair
        scores = _flip(scores, flips)  # the canonical-order scores are dropped here, not kept beside the copy
        crop_labels = upsample_labels(scores, crop_shape, LOGIT_THRESHOLD, self.chunk_elements)
        memory = memory.max(gpu_memory.snapshot(self.device))
        del scores
        crop_labels = crop_labels.cpu().numpy()
        t3 = time.perf_counter()
        times["fine_s"] = t3 - t2

        crop_labels = keep_largest_component(crop_labels, spacing, self.fine.preprocess.min_volume_mm3,
                                             self.all_components)
        mask = np.zeros(shape, dtype=np.uint8)
        mask[file_crop] = crop_labels
        times["post_s"] += time.perf_counter() - t3
        if memory.used_mb > gpu_memory.MEMORY_BAR_MB:
            logger.warning("%s: GPU memory in use (total - free) reached %.0f MB, above the %.0f MB bar",
                           case or "case", memory.used_mb, gpu_memory.MEMORY_BAR_MB)
        return CaseResult(mask, crop, fallback, uncertainty, times, memory, str(self.device))


def _same_labels(coarse: Stage, fine: Stage) -> LabelSet:
    """The label set both models segment; WeightsError when they differ (their labels would not match)."""
    def described(stage: Stage) -> str:
        return f"{stage.labels.name} ({', '.join(f'{lb.id} {lb.name}' for lb in stage.labels)})"

    if [(lb.id, lb.name) for lb in coarse.labels] != [(lb.id, lb.name) for lb in fine.labels]:
        raise WeightsError(f"{fine.path / 'model.pt'}: the fine model segments {described(fine)}, the coarse model "
                           f"{coarse.path / 'model.pt'} {described(coarse)}; give two models of one label set")
    return fine.labels


def _torch_friendly(array: np.ndarray) -> np.ndarray:
    """The array in a dtype torch holds without a float copy (int16/int32 stay), C-contiguous and writable.

    float64 becomes float32 (HU need no more; half the upload and no float64 resize), uint16 int32.
    """
    if array.dtype in (np.int16, np.int32, np.float32, np.uint8, np.int8):
        out = array
    elif array.dtype == np.uint16:
        out = array.astype(np.int32)
    else:
        out = array.astype(np.float32)
    if not out.flags.writeable:
        return np.array(out, order="C")
    return np.ascontiguousarray(out)


def pinned_copy(array: np.ndarray) -> np.ndarray:
    """`_torch_friendly(array)` in page-locked memory (a numpy view that keeps the pinned tensor alive), so the
    predictor's upload to the GPU is asynchronous; done in the reader thread, off the GPU's critical path."""
    return torch.from_numpy(_torch_friendly(array)).pin_memory().numpy()



def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error: torch's OutOfMemoryError, or the plain RuntimeError that cuDNN's allocation
    failures (CUDNN_STATUS_ALLOC_FAILED) and some CUDA kernels raise with "out of memory" in the text."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDNN_STATUS_ALLOC_FAILED" in text or "out of memory" in text)


def free_cuda_memory() -> None:
    """Collect what a failed attempt left (reference cycles included) and hand the cached blocks back to CUDA."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
