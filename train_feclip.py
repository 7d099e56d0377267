"""FE-CLIP training (single stage): FFE + LFS adapters at the tap blocks and `fc_patch`.

    python train_feclip.py                                  # tiny backbone on the synthetic set
    python train.py --model feclip --dataset MVTec --shot 0 # the same; ViT-L-14-336, 336 px
    python test.py --save_path ckpt/feclip --dataset VisA

The settings, loss and optimizer are FE-CLIP's own (models/feclip.py); `train.py` runs them.
Each epoch writes `feclip_<epoch>.pth` and `feclip.pth`; re-running with the same `--save_path`
resumes while epoch < `--epochs`.
"""

from __future__ import annotations

from utils.engine import job


def main(argv: list[str] | None = None) -> int:
    return job.main(argv, "feclip")


if __name__ == "__main__":
    raise SystemExit(main())
