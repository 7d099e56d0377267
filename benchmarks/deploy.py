"""Deployment backends: batch-1 latency and batch-8 throughput of the same exported graph in
torch (the model itself), onnxruntime and OpenVINO on this CPU, with how far each backend's maps
move from torch's.

    python benchmarks/deploy.py                                      # tiny backbone, seconds
    python benchmarks/deploy.py --model feclip
    python benchmarks/deploy.py --model_name ViT-L-14-336 --img_size 336  # random weights

Random weights (speed does not depend on them). The graph is exported once per run
(utils/deploy/export.py, the class's text anchors baked in); torch runs `AnomalyPredictor.predict`,
the others `ExportedPredictor`. The speed-up column is the ratio to torch in the same run.
Needs the deployment extra (requirements-deploy.txt); a backend not installed is a row saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device import seconds_per_call  # noqa: E402

from models.predictor import AnomalyPredictor  # noqa: E402
from models.registry import MODELS, model_class  # noqa: E402
from utils.core.runtime import cpu_kind  # noqa: E402
from utils.deploy.export import ExportedPredictor, export  # noqa: E402

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="aaclip", choices=tuple(MODELS))
    parser.add_argument("--model_name", default="tiny")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell (+1 warm-up)")
    args = parser.parse_args(argv)

    cls = model_class(args.model)
    config = cls.config_class(model_name=args.model_name, pretrained="", img_size=args.img_size)
    model = cls.from_config(config.resolve("Synthetic"), "cpu").eval()
    predictors: dict[str, Callable[[torch.Tensor], object]] = {}
    torch_predictor = AnomalyPredictor(model)
    predictors["torch"] = lambda images: torch_predictor.predict(images, ["object"] * len(images))
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        formats = ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
        export(torch_predictor, Path(folder), formats, "object", {})
        export_seconds = time.perf_counter() - started
        for backend in ("onnxruntime", "openvino"):
            if importlib.util.find_spec(backend) is None:
                continue
            exported = ExportedPredictor(Path(folder), backend)
            predictors[backend] = lambda images, e=exported: e.predict(
                images, ["object"] * len(images)
            )

        print(f"Deployment backends: {args.model}, {args.model_name} at {args.img_size} px")
        threads = torch.get_num_threads()
        exported = f"export (one trace, {' + '.join(formats)}) {export_seconds:.1f} s"
        print(f"CPU {cpu_kind()}, {threads} threads; {exported}\n")
        print("| backend | batch-1 latency ms | batch-8 images/s | speed-up b1 | speed-up b8 |"
              " maps vs torch |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        generator = torch.Generator().manual_seed(0)
        one = torch.rand(1, 3, args.img_size, args.img_size, generator=generator)
        eight = torch.rand(8, 3, args.img_size, args.img_size, generator=generator)
        reference = predictors["torch"](eight).anomaly_map
        span = float(reference.max() - reference.min())
        base = None
        for backend in ("torch", "onnxruntime", "openvino"):
            if backend not in predictors:
                print(f"| {backend} | not installed | | | | |")
                continue
            run = predictors[backend]
            latency = seconds_per_call(lambda run=run: run(one), CPU, args.repeats)
            batch = seconds_per_call(lambda run=run: run(eight), CPU, args.repeats)
            base = base or (latency, batch)
            moved = float((run(eight).anomaly_map - reference).abs().max()) / max(span, 1e-12)
            print(
                f"| {backend} | {latency * 1000:.1f} | {8 / batch:.1f} | "
                f"{base[0] / latency:.2f}x | {base[1] / batch:.2f}x | {moved:.1e} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
