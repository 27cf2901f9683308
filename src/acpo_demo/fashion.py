"""Fashion-MNIST for the embedded demo: IDX loading, captions and the prompt/image DataModule.

The images are the 70k 28x28 grayscale Fashion-MNIST images, padded to 32x32, repeated to three
channels and scaled to ``[-1, 1]`` (the convention of diffusers' VAEs). Captions are made from the
class names with templates and synonyms. Two more template sets are never used in training: the
*validation* templates (``wording="val"``), on which the demo's settings are chosen and its
training-time curves are drawn, and the *held-out* templates (``wording="heldout"``), on which the
chosen settings are measured once.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from acpo_lightning.data.collate import (
    SeededLoaders,
    collate_prompt_images,
    record_data_seed,
    resolve_data_seed,
)

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable naming a folder with the four IDX files (``.gz`` or not).
ENV_VAR = "ACPO_FASHION_MNIST"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: Words a caption may use for each class (index = label).
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top"),
    ("pair of trousers", "pair of pants", "pair of slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock", "gown"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "summer sandal", "open-toe sandal"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)
TRAIN_TEMPLATES = (
    "a photo of {a} {x}",
    "a product shot of {a} {x}",
    "a picture of {a} {x}",
    "{a} {x}",
    "an image of {a} {x}",
    "a black and white photo of {a} {x}",
)
#: Wordings never seen in training: the evaluation prompts.
HELDOUT_TEMPLATES = (
    "a catalogue image showing {a} {x}",
    "a grayscale snapshot of {a} {x}",
    "a small thumbnail of {a} {x}",
)
#: Wordings never seen in training, on which settings are chosen (never the evaluation prompts).
VAL_TEMPLATES = (
    "a studio photograph of {a} {x}",
    "a low resolution picture of {a} {x}",
    "a cropped shot of {a} {x}",
)
Wording = Literal["train", "val", "heldout"]
_TEMPLATES = {"train": TRAIN_TEMPLATES, "val": VAL_TEMPLATES, "heldout": HELDOUT_TEMPLATES}
_SPLITS = {"train": "train", "test": "t10k"}


class FashionMNISTNotFoundError(FileNotFoundError):
    """The Fashion-MNIST IDX files are not where they were looked for."""


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _templates(wording: str) -> tuple[str, ...]:
    if wording not in _TEMPLATES:
        raise ValueError(f"wording={wording!r}: choose one of {sorted(_TEMPLATES)}.")
    return _TEMPLATES[wording]


def caption(label: int, template: int = 0, synonym: int = 0, wording: Wording = "train") -> str:
    """The caption for class ``label`` with template and synonym indices (taken modulo their counts).

    Example:
        >>> caption(9, template=1, synonym=0)
        'a product shot of an ankle boot'
    """
    templates = _templates(wording)
    words = SYNONYMS[label]
    word = words[synonym % len(words)]
    return templates[template % len(templates)].format(a=_article(word), x=word)


def all_captions(wording: Wording = "train") -> list[tuple[int, str]]:
    """Every (label, caption) pair of a wording set."""
    templates = _templates(wording)
    return [
        (label, caption(label, t, s, wording))
        for label in range(len(CLASS_NAMES))
        for t in range(len(templates))
        for s in range(len(SYNONYMS[label]))
    ]


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files.

    Looks at ``root``, then ``$ACPO_FASHION_MNIST``, then Debian's ``/usr/share/datasets/fashion-mnist``,
    then torchvision's layout ``<root>/FashionMNIST/raw``.

    Raises:
        FashionMNISTNotFoundError: none of the places holds ``train-images-idx3-ubyte[.gz]``;
            the message says how to get the files.
    """
    candidates = [Path(p) for p in (root, os.environ.get(ENV_VAR)) if p] + [DEBIAN_DIR]
    candidates += [c / "FashionMNIST" / "raw" for c in list(candidates)]
    for folder in candidates:
        if any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", "")):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FashionMNISTNotFoundError(
        f"Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) not found; looked in {looked}. "
        "Fix: on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` (installs them under "
        f"{DEBIAN_DIR}); elsewhere download them with torchvision "
        "(`python -c \"import torchvision; torchvision.datasets.FashionMNIST('data', download=True)\"`) "
        f"and pass root='data' or set {ENV_VAR}=data."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    if dtype != 0x08:
        raise ValueError(f"{path}: IDX type {dtype:#x}, expected unsigned bytes (0x08)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for ext in (".gz", ""):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise FashionMNISTNotFoundError(f"{folder / stem}[.gz] is missing (the folder has the others)")


def load_fashion_mnist(
    split: Literal["train", "test"] = "train", root: str | Path | None = None
) -> tuple[Tensor, Tensor]:
    """Images ``[N, 3, 32, 32]`` in ``[-1, 1]`` (28x28 padded by 2 px of background) and labels ``[N]``.

    Raises:
        FashionMNISTNotFoundError: the files are missing (see :func:`find_fashion_mnist`).
        ValueError: ``split`` is not ``train`` or ``test``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    folder = find_fashion_mnist(root)
    images = _read_idx(_idx_file(folder, f"{_SPLITS[split]}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(folder, f"{_SPLITS[split]}-labels-idx1-ubyte"))
    pixels = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0)
    # an expanded view: three channels without three copies in memory
    pixels = F.pad(pixels[:, None], (2, 2, 2, 2), value=-1.0).expand(-1, 3, -1, -1)
    return pixels, torch.from_numpy(labels.astype(np.int64))


class FashionCaptionDataset(Dataset):
    """Fashion-MNIST images with captions drawn deterministically from (seed, index).

    Items: ``{"pixel_values": [3, 32, 32] in [-1, 1], "prompt": str, "label": int}``.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, wording: Wording = "train", seed: int = 0
    ) -> None:
        self.images, self.labels, self.wording, self.seed = images, labels, wording, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, index])
        text = caption(label, int(rng.integers(1 << 16)), int(rng.integers(1 << 16)), self.wording)
        return {"pixel_values": self.images[index], "prompt": text, "label": label}


def collate_fashion(items: Sequence[dict]) -> dict:
    """:func:`collate_prompt_images` plus ``labels`` (a LongTensor)."""
    batch = collate_prompt_images([{k: v for k, v in it.items() if k != "label"} for it in items])
    batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return batch


class FashionMNISTDataModule(SeededLoaders, pl.LightningDataModule):
    """Captioned Fashion-MNIST (train split for fitting, test split with validation wordings).

    Args:
        root: folder with the IDX files (default: ``$ACPO_FASHION_MNIST``, then Debian's path).
        batch_size: images per batch.
        train_size: use the first ``train_size`` training images (``None``: all 60k).
        val_size: validation images from the test split, captioned with the validation wordings
            (the held-out wordings stay for the final evaluation).
        data_seed: seed of the caption choice and the shuffling.
        num_workers: DataLoader worker processes.
        seed: deprecated name of ``data_seed``.

    Example:
        >>> dm = FashionMNISTDataModule(batch_size=4, train_size=8)
        >>> dm.setup("fit"); next(iter(dm.train_dataloader()))["pixel_values"].shape
        torch.Size([4, 3, 32, 32])
    """

    collate_fn = staticmethod(collate_fashion)

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        train_size: int | None = None,
        val_size: int = 64,
        data_seed: int = 0,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        data_seed = resolve_data_seed(data_seed, seed, type(self).__name__)
        super().__init__()
        self.save_hyperparameters(ignore=["seed"])
        record_data_seed(self, data_seed)
        find_fashion_mnist(root)  # fail at construction, before any model loads
        self.train_set: FashionCaptionDataset | None = None
        self.val_set: FashionCaptionDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_set is None:
            images, labels = load_fashion_mnist("train", hp.root)
            if hp.train_size is not None:
                images, labels = images[: hp.train_size], labels[: hp.train_size]
            self.train_set = FashionCaptionDataset(images, labels, "train", hp.data_seed)
            images, labels = load_fashion_mnist("test", hp.root)
            n = hp.val_size
            self.val_set = FashionCaptionDataset(images[:n], labels[:n], "val", hp.data_seed + 1)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)
