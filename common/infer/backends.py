"""Where the predictor's networks run: torch (any device) or ONNX Runtime (CPU), chosen by `--backend`.

A backend turns one network of an exported model folder into a forward callable x (1, 1, D, H, W) float32 ->
logits (1, C, D, H, W) on the same device, fixed to the stage's input size. `auto` is the fastest installed one as
measured by `benchmarks/cpu_backends.py` (BENCHMARKS.md "CPU backends"): ONNX Runtime on the CPU when it is
installed, torch eager otherwise and on CUDA (autocast fp16/bf16 there).

The ONNX graph of each network is exported on first use into `<model folder>/onnx/`, written atomically and keyed
by a hash of the network's weights, its name, the input size, the opset and the torch version, so a changed model (or a
changed `--fine-size`) exports anew and older graphs of that network are removed. The key is also stored inside the
graph (its metadata) and checked when it is loaded: a graph that is not the network's (files swapped or copied) or
does not load (truncated) is exported again. A read-only model folder falls back to a per-user cache folder; where
neither can be written, the network runs with torch (with a warning).

Each export also runs the graph in ONNX Runtime beside the torch network on a fixed phantom (`phantom_input`) and
stores the share of voxels whose labels agree in the graph's metadata. A graph below `MIN_LABEL_AGREEMENT` is not
used: that network runs with torch, with a warning. The stages' export steps call `export_model_graphs`, so a
model folder arrives with its graphs and the first prediction does not pay the export.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from common.core.files import atomic_path
from common.core.labelmaps import LOGIT_THRESHOLD, probs_to_labels
from common.core.logger import get_logger
from common.storage.checkpoint import state_digest
from common.storage.weights import load_model

logger = get_logger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
ONNX_OPSET = 17
ONNX_DIR = "onnx"

Forward = Callable[[torch.Tensor], torch.Tensor]


def onnxruntime_available() -> bool:
    """True when ONNX Runtime can be imported (the export itself needs only torch)."""
    return importlib.util.find_spec("onnxruntime") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "onnxruntime" on the CPU when installed, else "torch"; an impossible choice is a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if device.type != "cpu":
        if backend == "onnxruntime":
            raise ValueError(f"backend onnxruntime runs on the CPU only; use --backend torch on {device}")
        return "torch"
    if backend == "onnxruntime" and not onnxruntime_available():
        raise ValueError("backend onnxruntime requested but onnxruntime is not installed "
                         "(pip install onnxruntime, or use --backend torch)")
    if backend == "auto":
        return "onnxruntime" if onnxruntime_available() else "torch"
    return backend


def _weights_digest(net: nn.Module) -> str:
    """Hash of the network's parameters and buffers (names, shapes, dtypes, bytes): the graph's identity.

    Keyed by the weights rather than by model.pt's bytes, so models converted in memory (an original-release
    folder read directly) are cached the same way.
    """
    return state_digest(net.state_dict())


ONNX_KEY_FIELD = "semiseg_cache_key"  # the graph's metadata entry holding the key of its file name
ONNX_AGREEMENT_FIELD = "semiseg_label_agreement"  # share of phantom voxels whose labels agree with torch's
MIN_LABEL_AGREEMENT = 0.999  # below it a graph is not used and its network runs with torch


def onnx_cache_key(net: nn.Module, network: str, size_zyx: Sequence[int]) -> str:
    """The key of a network's graph: a hash of its weights, its name, the input size, the opset and torch's version."""
    size = "x".join(str(int(s)) for s in size_zyx)
    return hashlib.sha256(
        f"{_weights_digest(net)}|{network}|{size}|{ONNX_OPSET}|{torch.__version__}".encode()
    ).hexdigest()[:16]


def onnx_cache_path(net: nn.Module, model_dir: Path, network: str, size_zyx: Sequence[int],
                    cache_root: Path | None = None) -> Path:
    """Where the ONNX graph of `network` ("a"/"b") of the model in `model_dir` at `size_zyx` is cached.

    The name holds `onnx_cache_key`.
    """
    model_dir = Path(model_dir)
    size = "x".join(str(int(s)) for s in size_zyx)
    root = model_dir / ONNX_DIR if cache_root is None else cache_root
    return root / f"{network}_{size}_{onnx_cache_key(net, network, size_zyx)}.onnx"


def _user_cache_root(model_dir: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "semiseg_cssn" / "onnx" / hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]


def phantom_input(size_zyx: Sequence[int]) -> torch.Tensor:
    """A fixed input (1, 1, *size_zyx) in the networks' normalized units: a body ellipsoid holding brighter and
    darker blobs, so that the labels have regions and boundaries to agree on (unlike noise or a constant)."""
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, int(s)) for s in size_zyx], indexing="ij")
    image = torch.where(z**2 + (y / 0.7) ** 2 + (x / 0.85) ** 2 < 0.8, 0.3, -1.8)
    for cz, cy, cx, radius, value in ((0.1, -0.2, 0.3, 0.3, 1.2), (-0.2, 0.2, -0.3, 0.25, 0.6),
                                      (0.3, 0.1, 0.0, 0.15, -0.6), (-0.3, -0.1, 0.4, 0.12, 1.8)):
        image = torch.where((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < radius**2, value, image)
    return image[None, None].float()


def label_agreement(net: nn.Module, forward: Forward, size_zyx: Sequence[int]) -> float:
    """Share of the phantom's voxels where `forward` (e.g. an ONNX Runtime session) gives the torch network's label
    (the predictor's rule: the organ with the highest logit if it is above the threshold, else background)."""
    x = phantom_input(size_zyx)
    with torch.inference_mode():
        ref = probs_to_labels(net.eval()(x)[0], LOGIT_THRESHOLD)
        out = probs_to_labels(forward(x)[0].float(), LOGIT_THRESHOLD)
    return float((ref == out).float().mean())


def export_onnx(net: nn.Module, size_zyx: Sequence[int], path: Path) -> Path:
    """Export `net` (eval mode, CPU) for input (1, 1, *size_zyx) to `path` atomically, with its key and (when ONNX
    Runtime is installed) its label agreement with torch in the graph's metadata; remove older graphs of the same
    network and size beside it."""
    import onnx

    net = net.eval()
    x = torch.zeros((1, 1, *(int(s) for s in size_zyx)), dtype=torch.float32)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the labels are checked below
        torch.onnx.export(net, (x,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x"], output_names=["logits"])
        graph = onnx.load(str(tmp))
        graph.metadata_props.add(key=ONNX_KEY_FIELD, value=path.stem.rsplit("_", 1)[-1])
        if onnxruntime_available():
            agreement = label_agreement(net, OnnxRuntimeForward(tmp), size_zyx)
            graph.metadata_props.add(key=ONNX_AGREEMENT_FIELD, value=f"{agreement:.6f}")
        onnx.save(graph, str(tmp))
    prefix = path.name.rsplit("_", 1)[0] + "_"
    for old in path.parent.glob(f"{prefix}*.onnx"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
    logger.info("exported ONNX graph %s", path)
    return path


def cached_onnx(net: nn.Module, model_dir: Path, network: str, size_zyx: Sequence[int]) -> Path:
    """The cached ONNX graph of `network`, exported now if missing (model folder, else the user cache).

    A folder without our model.pt (the original release's layout, converted in memory) is the user's download:
    nothing is written into it, the graph goes to the user cache.
    """
    own_folder = (Path(model_dir) / "model.pt").is_file()
    path = onnx_cache_path(net, model_dir, network, size_zyx, None if own_folder else _user_cache_root(model_dir))
    if path.is_file():
        return path
    try:
        return export_onnx(net, size_zyx, path)
    except OSError as e:
        fallback = onnx_cache_path(net, model_dir, network, size_zyx, _user_cache_root(model_dir))
        logger.warning("cannot write the ONNX graph into %s (%s); using %s", path.parent, e, fallback.parent)
        if fallback.is_file():
            return fallback
        return export_onnx(net, size_zyx, fallback)


class OnnxRuntimeForward:
    """An ONNX Runtime CPU session with the torch forward's interface (tensor in, tensor out)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @property
    def cache_key(self) -> str | None:
        """The key the graph was exported under (`onnx_cache_key`), None for a graph without one."""
        return self.session.get_modelmeta().custom_metadata_map.get(ONNX_KEY_FIELD)

    @property
    def label_agreement(self) -> float | None:
        """The graph's label agreement with torch measured at its export (`label_agreement`), None if not stored."""
        value = self.session.get_modelmeta().custom_metadata_map.get(ONNX_AGREEMENT_FIELD)
        return None if value is None else float(value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, 1, D, H, W) at the exported size -> logits (1, C, D, H, W) float32 on the CPU."""
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


class LazyOnnxRuntimeForward:
    """OnnxRuntimeForward made on first use: a network the predictor never calls (network b without --ensemble or
    uncertainty) is never exported; the export traces one full-size forward, as long as a prediction's."""

    def __init__(self, net: nn.Module, model_dir: Path, network: str, size_zyx: Sequence[int]) -> None:
        self.net, self.model_dir, self.network, self.size_zyx = net, Path(model_dir), network, tuple(size_zyx)
        self._path: Path | None = None
        self._forward: OnnxRuntimeForward | None = None

    @property
    def path(self) -> Path:
        """The cached graph (exported now if it is not there yet)."""
        if self._path is None:
            self._path = cached_onnx(self.net, self.model_dir, self.network, self.size_zyx)
        return self._path

    def load(self) -> None:
        """Export (if needed) and open the session now, e.g. before timing. A cached graph that does not load or is
        another network's is exported again; where no graph can be written, or the graph's labels disagree with
        torch's, the torch network runs instead."""
        if self._forward is not None:
            return
        try:
            session = self._checked_session()
        except OSError as e:
            logger.warning("cannot write an ONNX graph of network %s of %s into the model folder or the user cache "
                           "(%s); running network %s with torch", self.network, self.model_dir, e, self.network)
            self._forward = self.net.eval()
            return
        agreement = session.label_agreement
        if agreement is not None and agreement < MIN_LABEL_AGREEMENT:
            logger.warning("ONNX graph %s: its labels agree with torch's on %.2f %% of the phantom's voxels (below "
                           "%.1f %%); running network %s with torch", session.path, 100 * agreement,
                           100 * MIN_LABEL_AGREEMENT, self.network)
            self._forward = self.net.eval()
            return
        self._forward = session

    def _checked_session(self) -> OnnxRuntimeForward:
        """The session of the cached graph, after checking it holds this network (its key) and its measured label
        agreement (graphs from before that was stored have none), else exported again."""
        path = self.path
        try:
            forward = OnnxRuntimeForward(path)
            if forward.cache_key == path.stem.rsplit("_", 1)[-1] and forward.label_agreement is not None:
                return forward
            problem = ("it is not this network's graph (its key differs: files swapped or copied?)"
                       if forward.cache_key != path.stem.rsplit("_", 1)[-1] else "it has no measured label agreement")
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's load errors have no common base (InvalidProtobuf, ...)
            problem = f"it does not load ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        logger.warning("cached ONNX graph %s: %s; exporting it again", path, problem)
        path.unlink(missing_ok=True)
        self._path = None
        return OnnxRuntimeForward(self.path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.load()
        assert self._forward is not None
        return self._forward(x)


def make_forwards(backend: str, networks: Mapping[str, nn.Module], model_dir: Path,
                  size_zyx: Sequence[int]) -> dict[str, Forward]:
    """Forward callables per network name for a resolved backend ("torch" or "onnxruntime"); ONNX graphs are
    exported and loaded on each network's first call."""
    if backend == "torch":
        return dict(networks)
    if backend == "onnxruntime":
        return {name: LazyOnnxRuntimeForward(net, Path(model_dir), name, size_zyx) for name, net in networks.items()}
    raise ValueError(f"backend {backend!r} is not resolved; call resolve_backend first")


def export_model_graphs(model_dir: str | os.PathLike, stage: str) -> dict[str, float]:
    """At a stage's export, when ONNX Runtime is installed: write the ONNX graph of every network of the model folder
    at its input size into the folder's cache, so that prediction finds them; returns {network: label agreement
    with torch}. An export that fails is a warning (prediction then exports on first use, or runs torch)."""
    if not onnxruntime_available():
        logger.info("ONNX Runtime is not installed: no ONNX graphs exported (prediction runs torch)")
        return {}
    model_dir = Path(model_dir)
    cpu = torch.device("cpu")
    model = load_model(model_dir, stage, cpu)
    agreements: dict[str, float] = {}
    for name, net in model.networks.items():
        try:
            session = LazyOnnxRuntimeForward(net, model_dir, name, model.preprocess.size_zyx)._checked_session()
        except Exception as e:  # noqa: BLE001 - torch.onnx and ONNX Runtime raise many unrelated types
            logger.warning("%s: no ONNX graph of network %s (%s: %s); prediction runs it with torch", model_dir,
                           name, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            continue
        agreements[name] = float(session.label_agreement)  # type: ignore[arg-type] - checked by _checked_session
        usable = agreements[name] >= MIN_LABEL_AGREEMENT
        (logger.info if usable else logger.warning)(
            "ONNX graph %s: labels agree with torch on %.3f %% of a phantom's voxels%s", session.path,
            100 * agreements[name], "" if usable else f" (below {100 * MIN_LABEL_AGREEMENT:.1f} %: prediction runs "
                                                     f"network {name} with torch)")
    return agreements
