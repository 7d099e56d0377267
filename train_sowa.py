"""SOWA training (single stage): HFWA adapters, prompt contexts and the fusion text Linear.

    python train_sowa.py                                    # tiny backbone on the synthetic set
    python train.py --model sowa --dataset VisA --shot 0    # the same; ViT-L-14-336, 336 px
    python test.py --save_path ckpt/sowa --dataset MVTec --k_shot 4 --pro_variant sowa

The settings, loss and optimizer are SOWA's own (models/sowa.py); `train.py` runs them. Each
epoch writes `sowa_<epoch>.pth` and `sowa.pth`; re-running with the same `--save_path` resumes
while epoch < `--epochs`.
"""

from __future__ import annotations

from utils.engine import job


def main(argv: list[str] | None = None) -> int:
    return job.main(argv, "sowa")


if __name__ == "__main__":
    raise SystemExit(main())
