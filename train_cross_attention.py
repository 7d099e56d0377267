"""Fine-tune AA-CLIP + cross-attention from a trained AA-CLIP (the user's fork's
`train_cross_attention.py`, wei-paul/AA-CLIP; the user's guide seeds/001).

    python train.py --save_path ckpt/baseline
    python train_cross_attention.py --save_path ckpt/cross_attn \\
        --load_base_text_adapter ckpt/baseline/text_adapter.pth \\
        --load_base_image_adapter ckpt/baseline/image_adapter.pth
    python test.py --save_path ckpt/cross_attn

A fair comparison (seed 001): every AA-CLIP setting not given on the command line is inherited from
the base checkpoint's config (backbone, adapters, data set, shot, seed, epochs, learning rates,
batch sizes, `stage1_loss`), so base and fine-tuned runs differ only by the new modules. The fork
also switched the stage-1 loss to `sum_levels` while adding the modules; pass `--stage1_loss
sum_levels` to reproduce it. Base adapters load strictly (the fork fell back to random adapters
silently) and their Adam moments carry over (`--no-carry_base_optimizer`: fresh, as the fork);
the new modules start with fresh optimizer state.

The model (models/aaclip_cross_attn.py) trains the same two stages as AA-CLIP: stage 1 the text
adapters and `text_cross_attn`, stage 2 the image adapters and `image_cross_attn`. Checkpoints keep
the fork's names, `text_adapter_cross_attn.pth` and `image_adapter_cross_attn[_<epoch>].pth`;
re-running with the same save path resumes.
"""

from __future__ import annotations

from utils.engine import job


def main(argv: list[str] | None = None) -> int:
    return job.main(argv, "aaclip_cross_attn")


if __name__ == "__main__":
    raise SystemExit(main())
