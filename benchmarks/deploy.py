"""Prints a deployment table per model: torch against its ONNX and OpenVINO exports on this CPU.

The same models in torch and as exported graphs (onnxruntime fp32, OpenVINO fp32/bf16/int8), one
table per CPU kind: batch-1 latency, batch-8 images/s, peak memory, graph size, achieved GFLOP/s
against a GEMM of the same precision timed in the same run, and with `--accuracy` what each
precision costs in image and pixel AUROC.

    python benchmarks/deploy.py                                   # tiny backbone: a minute
    python benchmarks/deploy.py --model_name ViT-L-14-336         # paper sizes, random weights
    python benchmarks/deploy.py --accuracy                        # + AUROC per precision

Speed rows use random weights (speed does not depend on them) at each model's paper input size
(AA-CLIP 518, FE-CLIP and SOWA 336; `--img_size` overrides). Each row runs in its own process, so
its peak memory (RSS) is its own; the graphs are made by predict.py's own export (int8: NNCF on
normal images of the synthetic set). FLOPs per image are counted on the torch forward
(`torch.utils.flop_counter`); a row's GFLOP/s is that times its batch-8 images/s, next to a
2048^3 GEMM in the row's precision (torch fp32/bf16, `torch._int_mm` int8). `--accuracy`
trains the tiny model on the synthetic set and evaluates it with test.py's loop in torch and on
each exported precision. bf16 rows run only where the CPU computes bf16 natively (as `--amp
auto` and `export --precision bf16` decide). Needs the deployment extra.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device import seconds_per_call  # noqa: E402

from datasets.synthetic import ensure_synthetic  # noqa: E402
from models.registry import load_trained_model, model_class  # noqa: E402
from utils.core.checkpoint import save_checkpoint  # noqa: E402
from utils.core.config import HelpFormatter  # noqa: E402
from utils.core.runtime import cpu_kind, native_bf16, peak_rss_bytes  # noqa: E402
from utils.deploy.package import ExportConfig, export  # noqa: E402
from utils.engine import job  # noqa: E402
from utils.engine.training import RunConfig, checkpoint_config  # noqa: E402
from utils.evaluation.evaluate import EvalConfig, evaluate  # noqa: E402
from utils.inference.graph import ExportedPredictor  # noqa: E402
from utils.inference.predictor import AnomalyPredictor  # noqa: E402

CPU = torch.device("cpu")
FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# (row, backend, precision): torch rows run the checkpoint, the others its export
ROWS = (
    ("torch fp32", "torch", "fp32"),
    ("torch bf16", "torch", "bf16"),
    ("onnxruntime fp32", "onnxruntime", "fp32"),
    ("openvino fp32", "openvino", "fp32"),
    ("openvino bf16", "openvino", "bf16"),
    ("openvino int8", "openvino", "int8"),
)
GEMM = 2048


def cpu_header() -> str:
    """lscpu's model name and the ISA flags that decide int8/bf16 speed."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), "unknown CPU")  # fmt: skip
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))  # fmt: skip
    present = " ".join(flag for flag in FLAGS if flag in flags) or "none of " + " ".join(FLAGS)
    return f"{name}; {present}; torch: {cpu_kind()}; {torch.get_num_threads()} threads"


def gemm_gflops(precision: str) -> float:
    """GFLOP/s of one 2048^3 matrix product in `precision` (median of 3 after a warm-up)."""
    generator = torch.Generator().manual_seed(0)
    if precision == "int8":
        a = torch.randint(-128, 127, (GEMM, GEMM), dtype=torch.int8, generator=generator)
        b = torch.randint(-128, 127, (GEMM, GEMM), dtype=torch.int8, generator=generator)
        call = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a = torch.rand(GEMM, GEMM, generator=generator).to(dtype)
        b = torch.rand(GEMM, GEMM, generator=generator).to(dtype)
        call = lambda: a @ b  # noqa: E731
    seconds = seconds_per_call(call, CPU, 3)
    return 2 * GEMM**3 / seconds / 1e9


def random_run(model: str, model_name: str, img_size: int | None, folder: Path) -> Path:
    """A checkpoint of `model` with random weights (what predict.py export reads)."""
    cls = model_class(model)
    config = cls.config_class(model_name=model_name, pretrained="", img_size=img_size)
    config = config.resolve("Synthetic" if model_name == "tiny" else "MVTec")
    trained = cls.from_config(config, CPU)
    stage = trained.stages()[-1]
    payload = {
        "epoch": 0,
        **trained.stage_state(stage),
        "config": checkpoint_config(trained, RunConfig(save_path=folder)),
    }
    if model == "aaclip":  # its text adapter file beside the image adapter's
        text = trained.stages()[0]
        save_checkpoint(folder / f"{text.stem}.pth", {**payload, **trained.stage_state(text)})
    path = folder / f"{stage.stem}.pth"
    save_checkpoint(path, payload)
    return path


def export_all(checkpoint: Path, folder: Path, normal: Path, precisions: list[str]) -> dict:
    """predict.py's export of each precision; {precision: (folder, seconds)}."""
    exports = {}
    for precision in precisions:
        out = folder / precision
        formats = ["onnx", "openvino"] if precision == "fp32" else ["openvino"]
        config = ExportConfig(
            checkpoint=checkpoint,
            out=out,
            format=formats,
            precision=precision,
            calibration_dir=normal,
            calibration_size=64,
            progress=False,
        )
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its own report lines
            export(config, {})
        exports[precision] = (out, time.perf_counter() - started)
    return exports


def measure_row(spec: dict) -> dict:
    """One row, in its own process: latency at batch 1, images/s at batch 8, peak RSS."""
    backend, precision, size = spec["backend"], spec["precision"], spec["img_size"]
    if backend == "torch":
        _, model, _ = load_trained_model(Path(spec["checkpoint"]), CPU)
        predictor = AnomalyPredictor(model, amp="bf16" if precision == "bf16" else "none")
    else:
        predictor = ExportedPredictor(Path(spec["export"]), backend)
    generator = torch.Generator().manual_seed(0)
    one = torch.rand(1, 3, size, size, generator=generator)
    eight = torch.rand(8, 3, size, size, generator=generator)
    latency = seconds_per_call(lambda: predictor.predict(one, ["object"]), CPU, spec["repeats"])
    batch = seconds_per_call(lambda: predictor.predict(eight, ["object"] * 8), CPU, 1)
    return {"latency": latency, "images_per_s": 8 / batch, "peak_gib": peak_rss_bytes() / 2**30}


def flops_per_image(checkpoint: Path, size: int) -> float:
    """FLOPs of one torch forward at batch 1 (matrix products, attention, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, model, _ = load_trained_model(checkpoint, CPU)
    predictor = AnomalyPredictor(model)
    image = torch.rand(1, 3, size, size)
    predictor.predict(image, ["object"])  # the class's text, computed once, is not per image
    with FlopCounterMode(display=False) as counter:
        predictor.predict(image, ["object"])
    return float(counter.get_total_flops())


def speed_table(args: argparse.Namespace, scratch: Path, normal: Path) -> None:
    bf16 = native_bf16(CPU)
    gemm = {precision: gemm_gflops(precision) for precision in ("fp32", "bf16", "int8")}
    print(f"\nCPU: {cpu_header()}")
    print(
        "GEMM 2048^3 GFLOP/s: "
        + ", ".join(f"{precision} {value:.0f}" for precision, value in gemm.items())
        + ("" if bf16 else " (bf16 emulated: its rows are left out)")
    )
    for model in args.models:
        folder = scratch / model
        folder.mkdir()
        checkpoint = random_run(model, args.model_name, args.img_size, folder)
        _, built, _ = load_trained_model(checkpoint, CPU)
        size = built.img_size
        del built
        precisions = ["fp32", *(["bf16"] if bf16 else []), "int8"]
        exports = export_all(checkpoint, folder / "exports", normal, precisions)
        flops = flops_per_image(checkpoint, size)
        made = ", ".join(f"{p} {seconds:.0f} s" for p, (_, seconds) in exports.items())
        print(
            f"\n{model}, {args.model_name} at {size} px, {flops / 1e9:.1f} GFLOP per image "
            f"(export: {made})\n"
        )
        print("| row | batch-1 ms | batch-8 images/s | vs torch fp32 | peak GiB | graph MB "
              "| GFLOP/s | of GEMM |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for row, backend, precision in ROWS:
            if precision == "bf16" and not bf16:
                continue
            spec = {
                "backend": backend,
                "precision": precision,
                "img_size": size,
                "repeats": args.repeats,
                "checkpoint": str(checkpoint),
                "export": str(exports[precision][0]) if backend != "torch" else "",
            }
            completed = subprocess.run(
                [sys.executable, __file__, "--row", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            base = base or result["images_per_s"]
            graph = "" if backend == "torch" else f"{graph_megabytes(exports[precision][0]):.0f}"
            achieved = flops * result["images_per_s"] / 1e9
            print(
                f"| {row} | {result['latency'] * 1000:.0f} | {result['images_per_s']:.2f} | "
                f"{result['images_per_s'] / base:.2f}x | {result['peak_gib']:.2f} | {graph} | "
                f"{achieved:.0f} | {achieved / gemm[precision]:.0%} |"
            )


def graph_megabytes(folder: Path) -> float:
    """Size of an export's graph files (one format: OpenVINO's when there, else ONNX)."""
    names = ("model.xml", "model.bin") if (folder / "model.xml").is_file() else ("model.onnx",)
    return sum((folder / name).stat().st_size for name in names) / 1e6


def accuracy_table(scratch: Path, data_root: Path) -> None:
    """The tiny AA-CLIP trained on the synthetic set (the quick start's recipe), evaluated in
    torch and on each exported precision with test.py's loop."""
    run = scratch / "trained"
    argv = ["--data_root", str(data_root), "--save_path", str(run), "--device", "cpu"]
    if job.main([*argv, "--no-progress"]) != 0:
        raise SystemExit("training the tiny model failed; see its log above")
    config = EvalConfig(save_path=run, data_root=data_root, device="cpu", progress=False)
    config = dataclasses.replace(config, results_dir=scratch / "eval")
    rows = [("torch fp32", evaluate(config, {})[0])]
    per_class = scratch / "normal"  # a folder of normal images per class, as an export reads
    per_class.mkdir()
    for name in ("tile", "stripes", "dots"):
        (per_class / name).symlink_to((data_root / name / "train" / "good").resolve())
    precisions = ["fp32", *(["bf16"] if native_bf16(CPU) else []), "int8"]
    for precision in precisions:
        out = scratch / f"trained_{precision}"
        formats = ["onnx", "openvino"] if precision == "fp32" else ["openvino"]
        with contextlib.redirect_stdout(io.StringIO()):
            export(
                ExportConfig(
                    checkpoint=run,
                    out=out,
                    format=formats,
                    precision=precision,
                    dataset="Synthetic",
                    data_root=data_root,
                    calibration_dir=per_class,
                    progress=False,
                ),
                {},
            )
        backends = ["onnxruntime", "openvino"] if precision == "fp32" else ["openvino"]
        for backend in backends:
            (evaluated,) = evaluate(
                dataclasses.replace(config, backend=backend, checkpoint=out), {}
            )
            rows.append((f"{backend} {precision}", evaluated))
    print("\nAccuracy: the tiny AA-CLIP trained on the synthetic set (3 classes, 96 test images), "
          "mean over classes\n")  # fmt: skip
    print("| row | I-AUROC | P-AUROC | I-AUROC - fp32 | P-AUROC - fp32 |")
    print("|---|---:|---:|---:|---:|")
    reference = None
    for name, result in rows:
        means = {
            column: sum(metrics[column] for metrics in result.per_class.values())
            / len(result.per_class)
            for column in ("I-AUROC", "P-AUROC")
        }
        reference = reference or means
        print(
            f"| {name} | {100 * means['I-AUROC']:.2f} | {100 * means['P-AUROC']:.2f} | "
            f"{100 * (means['I-AUROC'] - reference['I-AUROC']):+.2f} | "
            f"{100 * (means['P-AUROC'] - reference['P-AUROC']):+.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["aaclip", "feclip", "sowa"],
        help="registered models to measure, one speed table each",
    )
    parser.add_argument(
        "--model_name", default="tiny", help="backbone: tiny (about a minute) or e.g. ViT-L-14-336"
    )
    parser.add_argument(
        "--img_size",
        type=int,
        default=None,
        help="input side in pixels (default: each model's paper size on this backbone; ViT-L: "
        "AA-CLIP 518, FE-CLIP and SOWA 336)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed batch-1 calls per row, after one warm-up"
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="also train the tiny AA-CLIP and print each precision's image and pixel AUROC",
    )
    parser.add_argument(
        "--no-speed",
        dest="speed",
        action="store_false",
        help="leave out the speed tables (default: they are printed)",
    )
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row's process
    args = parser.parse_args(argv)
    if args.row is not None:
        print(json.dumps(measure_row(json.loads(args.row))))
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    data_root = ensure_synthetic(Path("data/Synthetic"))
    normal = data_root / "tile" / "train" / "good"
    with tempfile.TemporaryDirectory() as folder:
        if args.speed:
            speed_table(args, Path(folder), normal)
        if args.accuracy:
            accuracy_table(Path(folder), data_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
