"""Prints one Markdown table of a device's throughput, memory, MFU and training step per model.

One device's numbers in one Markdown table: test-time throughput of the four models at their
paper resolution in fp32 and bf16 at batch 1, 8 and 32 with peak memory and MFU, and one
training step per model. benchmarks/device.sh runs it with the CUDA tests and the evaluation path.

    python benchmarks/device.py                                   # ViT-L-14-336, CUDA if any
    python benchmarks/device.py --device cpu --model_name tiny    # the check on a CPU

Random weights (speed does not depend on them). FLOPs are counted from the model
(`torch.utils.flop_counter` over one fp32 `predict` of one image: matrix products and
convolutions, the work MFU is about) and MFU is achieved FLOP/s over the device's peak for the
row's precision: dense tensor-core peaks of known GPUs (fp32 rows: the non-tensor fp32 peak,
since TF32 is off by default), or `--peak_tflops` for others; CPUs print n/a without it. Peak
memory is CUDA's max allocated, or the process's RSS on a CPU.

A tiled row scores one 2448 x 2048 image (MVTec AD 2's largest) with AA-CLIP by tiles of its
input side, overlap 0.25, at the largest batch (`utils.inference.resolution.TiledPredictor`,
stitching included): tiles/s and peak memory.

A last table puts `torch.compile` on the test-time forward + maps (`_predict`) of the models in
`--compile_models` beside eager at the largest batch, in the modes of `--compile_modes` (on CUDA
by default `default` and `reduce-overhead`, i.e. with CUDA graphs; none on a CPU, where it
measured no gain: 1.02x on ViT-L at 224 px with frozen weights, 0.96x without, after 50-75 s of
compiling), with the compile time and the maps' deviation from eager (max |diff| over the range).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import (  # noqa: E402
    build_model,
    fit_step,
    inference_step,
    peak_memory_gib,
    random_batch,
)

from datasets.tiling import TileConfig  # noqa: E402
from models.registry import MODELS, model_class  # noqa: E402
from utils.core.config import HelpFormatter  # noqa: E402
from utils.core.runtime import cpu_kind, resolve_device  # noqa: E402
from utils.inference.predictor import AnomalyPredictor  # noqa: E402
from utils.inference.resolution import TiledPredictor  # noqa: E402

# Dense peak TFLOP/s (fp32 non-tensor, bf16 tensor) by a part of the device's name.
PEAKS = {
    "H200": (67.0, 989.0),
    "H100": (67.0, 989.0),
    "A100": (19.5, 312.0),
    "L40S": (91.6, 362.0),
    "RTX 4090": (82.6, 165.2),
    "RTX 3090": (35.6, 71.0),
}


def device_peaks(device: torch.device, override: float | None) -> dict[str, float | None]:
    """{amp: peak FLOP/s or None} for the rows' precisions."""
    if override is not None:
        return {"none": override * 1e12, "bf16": override * 1e12}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (fp32, bf16) in PEAKS.items():
            if key in name:
                return {"none": fp32 * 1e12, "bf16": bf16 * 1e12}
    return {"none": None, "bf16": None}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(call, device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def images(batch: int, size: int, device: torch.device) -> dict:
    """throughput.py's seeded training batch at `batch` images of `size` px."""
    return random_batch(argparse.Namespace(batch_size=batch, img_size=size), device)


def input_size(args: argparse.Namespace, model_name: str) -> int:
    """`--img_size`, else the model's paper resolution on this backbone (tiny: its own), as
    the model's config resolves it."""
    config = model_class(model_name).config_class(model_name=args.model_name)
    return args.img_size or config.resolve("").img_size


def tiled_rows(args: argparse.Namespace, device: torch.device) -> list[str]:
    """AA-CLIP over one 2448 x 2048 image by tiles of its input side (overlap 0.25) at the
    largest batch: tiles/s and peak memory."""
    size = input_size(args, "aaclip")
    model = build_model(
        "aaclip", argparse.Namespace(model_name=args.model_name, img_size=size), device
    )
    amp = "bf16" if device.type == "cuda" else "none"
    tiling = TileConfig(size, 0.25)
    predictor = TiledPredictor(AnomalyPredictor(model, amp=amp), tiling, max(args.batches))
    pixels = np.random.default_rng(0).integers(0, 256, (2048, 2448, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    tiles = len(predictor.tiler.positions(image))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = seconds_per_call(lambda: predictor.predict_image(image, "can"), device, args.repeats)
    return [
        "",
        "| model | px | amp | tiled image | tiles | batch | tiles/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| aaclip | {size} | {amp} | 2448 x 2048, overlap 0.25 | {tiles} | {max(args.batches)} "
        f"| {tiles / seconds:.1f} | {peak_memory_gib(device):.2f} |",
    ]


def compile_rows(args: argparse.Namespace, device: torch.device, modes: list[str]) -> list[str]:
    """torch.compile of each model's `_predict` against eager at the largest batch."""
    amp = "bf16" if device.type == "cuda" else "none"
    batch = max(args.batches)
    lines = ["", "| model | px | amp | batch | compile mode | compile s | images/s | vs eager "
                 "| maps vs eager |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model_name in args.compile_models:
        size = input_size(args, model_name)
        settings = argparse.Namespace(model_name=args.model_name, img_size=size)
        model = build_model(model_name, settings, device)
        data = images(batch, size, device)
        step = inference_step(model, amp, data)
        eager = seconds_per_call(step, device, args.repeats)
        reference = step()
        span = (reference.max() - reference.min()).item()
        lines.append(f"| {model_name} | {size} | {amp} | {batch} | eager | | "
                     f"{batch / eager:.1f} | 1.00x | |")  # fmt: skip
        predict = model._predict
        for mode in modes:
            torch._dynamo.reset()
            model._predict = torch.compile(predict, mode=mode)
            start = time.perf_counter()
            step()
            synchronize(device)
            compiling = time.perf_counter() - start
            seconds = seconds_per_call(step, device, args.repeats)
            deviation = (step() - reference).abs().max().item() / span
            lines.append(
                f"| {model_name} | {size} | {amp} | {batch} | {mode} | {compiling:.0f} | "
                f"{batch / seconds:.1f} | {eager / seconds:.2f}x | {deviation:.1e} |"
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--model_name", default="ViT-L-14-336", help="backbone, or tiny for a quick check on a CPU"
    )
    parser.add_argument(
        "--img_size",
        type=int,
        default=None,
        help="input side in pixels (default: each model's paper resolution on this backbone)",
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 32], help="test-time batch sizes to time"
    )
    parser.add_argument(
        "--train_batch", type=int, default=8, help="batch size of the timed training step"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per row (their median), after a warm-up"
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for MFU (default: the known dense peak of the GPU; on a "
        "CPU none, and MFU prints n/a)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write the table to this file (default: only print it)",
    )
    parser.add_argument(
        "--compile_models",
        nargs="*",
        default=["aaclip"],
        choices=tuple(MODELS),
        metavar="MODEL",
        help="models whose compiled test-time forward is timed in the last table, of %(choices)s",
    )
    parser.add_argument(
        "--compile_modes",
        nargs="*",
        default=None,
        help="torch.compile modes to time (default: default and reduce-overhead on CUDA, none "
        "on a CPU)",
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peaks = device_peaks(device, args.peak_tflops)
    shown = {amp: f"{peak / 1e12:g}" if peak else "n/a" for amp, peak in peaks.items()}
    lines = [
        f"Device: {name} ({device}); {args.model_name}, random weights; CPU {cpu_kind()}; "
        f"peak TFLOP/s fp32 {shown['none']}, "
        f"bf16 {shown['bf16']}",
        "",
        "| model | px | amp | batch | images/s | peak GiB | GFLOP/image | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    steps = []
    for model_name in MODELS:
        size = input_size(args, model_name)
        settings = argparse.Namespace(model_name=args.model_name, img_size=size)
        model = build_model(model_name, settings, device)
        count = inference_step(model, "none", images(1, size, device))
        count()  # the class's text, cached by the predictor, is not the image's work
        with FlopCounterMode(display=False) as counter:
            count()
        flops = counter.get_total_flops()
        for amp in ("none", "bf16"):
            for batch in args.batches:
                data = images(batch, size, device)
                step = inference_step(model, amp, data)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    seconds = seconds_per_call(step, device, args.repeats)
                except torch.OutOfMemoryError:
                    lines.append(f"| {model_name} | {size} | {amp} | {batch} | out of memory |"
                                 " | | | |")  # fmt: skip
                    continue
                rate = batch / seconds
                achieved = flops * rate
                peak = peaks[amp]
                mfu = f"{achieved / peak:.1%}" if peak else "n/a"
                lines.append(
                    f"| {model_name} | {size} | {amp} | {batch} | {rate:.1f} | "
                    f"{peak_memory_gib(device):.2f} | {flops / 1e9:.1f} | {achieved / 1e12:.2f} "
                    f"| {mfu} |"
                )
        amp = "bf16" if device.type == "cuda" else "none"
        stage_index = len(model.stages()) - 1
        step = fit_step(model, stage_index, amp, images(args.train_batch, size, device))
        steps.append((model_name, size, amp, seconds_per_call(step, device, args.repeats)))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines += ["", f"| model | px | amp | training step s (batch {args.train_batch}) |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| {m} | {s} | {a} | {seconds:.3f} |" for m, s, a, seconds in steps]
    lines += tiled_rows(args, device)
    modes = args.compile_modes
    if modes is None:
        modes = ["default", "reduce-overhead"] if device.type == "cuda" else []
    if modes and args.compile_models:
        lines += compile_rows(args, device, modes)
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
