"""Train a model: AA-CLIP's two stages (`train_text_adapter`: the text adapters, then
`train_image_adapter`: the image adapters) by default, or any registered model with `--model`
(aaclip_cross_attn, feclip, sowa).

    python train.py                                  # AA-CLIP, tiny backbone, synthetic set
    python train.py --dataset VisA --shot 32         # ViT-L-14-336 + openai weights, 518 px
    python train.py --model feclip --dataset MVTec --shot 0
    python train.py --model sowa --help              # that model's settings

Every setting is a field of the model's config dataclass (models/<model>.py) or of
`utils.engine.training.RunConfig`; `--config configs/<model>.yaml` sets defaults, flags win. The
model defines its stages, optimizers and losses; `utils.engine.job` runs `for stage in
model.stages()` through the one loop, resuming from the save path while epoch < total
(optimizer, scheduler and RNG states restored).
"""

from __future__ import annotations

from utils.engine import job


def main(argv: list[str] | None = None) -> int:
    return job.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
