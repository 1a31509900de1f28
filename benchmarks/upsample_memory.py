"""Peak temporary memory of the fine label resize (`common.infer.upsample.upsample_labels`) per chunk element.

    python -m benchmarks.upsample_memory [--crop Z,Y,X] [--chunk N] [--dtype fp16|fp32]

Each measurement runs in a fresh child process and reads its peak resident memory (ru_maxrss) before and after
one call, so it counts every temporary the call allocates (CPU; on a GPU the same tensors are allocated, and
benchmarks/gpu_check.py reads the allocator instead). Cases, on network-grid scores (13, 48, 48, 48) resized to
the crop size:
- organs: six smooth blobs, the shape of a trained network's output (sparse boundaries: the per-voxel path);
- noise: every channel near the threshold everywhere, an untrained network (the dense per-chunk path);
- baseline: the straightforward full resize of all 13 channels then argmax (what the chunked resize replaces).
The figure printed is (peak - before - the uint8 output) / min(chunk, crop voxels), in bytes per chunk element
(per crop voxel for the baseline);
`common.infer.upsample.UPSAMPLE_BYTES_PER_ELEMENT` is its worst case.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource

import torch
import torch.nn.functional as F


def _scores(kind: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 48)] * 3, indexing="ij"))
    scores = torch.full((13, 48, 48, 48), -4.0)
    if kind == "noise":
        coarse = torch.randn(1, 13, 12, 12, 12, generator=gen) * 0.5
        scores = F.interpolate(coarse, size=(48, 48, 48), mode="trilinear", align_corners=True)[0]
    else:
        for c in range(6):
            centre = torch.rand(3, 1, 1, 1, generator=gen) * 1.2 - 0.6
            radius = 0.15 + 0.1 * c / 6
            scores[c] = 4.0 * (1.0 - ((grid - centre) ** 2).sum(0).sqrt() / radius)
    return scores.to(dtype).contiguous()


def _child(kind: str, crop: tuple[int, int, int], chunk: int, dtype_name: str, queue: mp.Queue) -> None:
    from common.core.labelmaps import probs_to_labels
    from common.infer.upsample import upsample_labels

    torch.set_num_threads(1)
    dtype = torch.float16 if dtype_name == "fp16" else torch.float32
    scores = _scores("organs" if kind == "baseline" else kind, dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if kind == "baseline":
        labels = probs_to_labels(F.interpolate(scores.float()[None], size=crop, mode="trilinear",
                                               align_corners=True)[0], 0.0)
    else:
        labels = upsample_labels(scores, crop, 0.0, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((peak - before - labels.numel(), int(labels.numel())))


def measure(kind: str, crop: tuple[int, int, int], chunk: int, dtype_name: str) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(kind, crop, chunk, dtype_name, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", default="160,320,320", help="crop size Z,Y,X the scores are resized to")
    parser.add_argument("--chunk", type=int, default=1 << 22, help="chunk_elements passed to upsample_labels")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"), help="score dtype (fp16 on CUDA)")
    args = parser.parse_args()
    crop = tuple(int(v) for v in args.crop.split(","))
    voxels = crop[0] * crop[1] * crop[2]
    per = min(args.chunk, voxels)
    print(f"crop {crop} ({voxels / 1e6:.1f} M voxels), chunk {args.chunk}, scores {args.dtype}, 1 thread")
    print(f"{'case':<10}{'temporaries MB':>16}{'bytes per element':>20}")
    for kind in ("organs", "noise", "baseline"):
        extra, _ = measure(kind, crop, args.chunk, args.dtype)
        # the baseline has no chunks: per crop voxel
        print(f"{kind:<10}{extra / 2**20:>16.1f}{extra / (voxels if kind == 'baseline' else per):>20.1f}")


if __name__ == "__main__":
    main()
