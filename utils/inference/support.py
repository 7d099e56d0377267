"""The k-shot support settings, declared once for test.py and export, and where a class's
support images come from: a folder of your own normal images, or a data set's train split."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from datasets.catalog import DatasetInfo
from datasets.folder import list_images
from datasets.support import draw_support
from utils.core.config import RUN, setting
from utils.core.errors import ConfigError, DataError
from utils.inference.predictor import Predictor


@dataclasses.dataclass
class SupportConfig:
    """A k-shot memory of normal images per class (SOWA)."""

    k_shot: int = setting(
        0, "k normal images per class in a k-shot memory (SOWA; 0: zero-shot)", kind=RUN, minimum=0
    )
    support_dir: Path | None = setting(
        None,
        "the k-shot support images: <dir>/<class>/ per class, or the folder itself for one "
        "class (default: drawn from the data set's train split)",
        kind=RUN,
    )
    support_seed: int = setting(
        42, "seed of the k-shot support draw (the original draws unseeded)", kind=RUN
    )

    def check_support(self) -> None:
        """A support folder is read only by a k-shot memory: refuse it without --k_shot."""
        if self.support_dir is not None and self.k_shot == 0:
            raise ConfigError(
                f"--support_dir {self.support_dir} is read only for a k-shot memory: pass "
                "--k_shot k (k images drawn from it), or leave --support_dir out"
            )


def class_folder(root: Path, name: str, several: bool, flag: str) -> Path:
    """`<root>/<name>/` when a command handles several classes, else `root` itself."""
    folder = Path(root) / name if several else Path(root)
    if not folder.is_dir():
        if several:
            raise DataError(
                f"{flag} {root} has no folder {name}/; with several classes it holds one each"
            )
        raise DataError(f"{flag} {root} is not a folder; pass a folder of images")
    return folder


def support_paths(
    config: SupportConfig,
    class_name: str,
    several: bool = False,
    dataset: str | DatasetInfo | None = None,
    root: Path | None = None,
) -> list[Path]:
    """The k support images of a class (`config.k_shot` >= 1), drawn with
    `random.Random(support_seed)` from `--support_dir` (its `<class>/` folder when `several`)
    or else from `dataset`'s train split under `root`."""
    if config.support_dir is not None:
        candidates = list_images(
            class_folder(config.support_dir, class_name, several, "--support_dir")
        )
        return random.Random(config.support_seed).sample(
            candidates, min(config.k_shot, len(candidates))
        )
    if dataset is None:
        raise ConfigError("--k_shot needs --support_dir, or --dataset with its train split")
    return draw_support(dataset, root, class_name, config.k_shot, config.support_seed)


def set_class_support(predictor: Predictor, paths: list[Path]) -> None:
    """A class's k-shot memory from its support images, prepared as its test images are (whole,
    or every tile at the same scale)."""
    predictor.set_support(predictor.support_images(paths))
