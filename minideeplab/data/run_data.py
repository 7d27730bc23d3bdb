"""What data a run uses, and how to recognise it again.

- ``folder_split``: the train/validation split of a single dataset folder (``train.build_datasets`` uses it);
- ``evaluation_set``: what ``minideeplab evaluate`` scores: by default the run's own validation images;
- ``dataset_fingerprint`` / ``check_data_fingerprint``: a record of a run's files (names, byte sizes, CRC-32 of the
  contents; the size and seed of a synthetic set) kept in its checkpoints, and the refusal to resume on data that
  changed since the run started.

The functions take the run's ``train.TrainConfig`` (any object with its fields).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .folder import FolderDataset
from .loader import ConcatDataset, Subset
from .synthetic import SYNTHETIC_DATA, SyntheticShapes


def folder_split(cfg, n: int, root) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, validation indices)`` of a single folder of ``n`` pairs: a permutation drawn from the
    run's seed, its first ``round(n * val_fraction)`` (at least 1, at most n - 1) for validation."""
    if n < 2:
        raise ValueError(f"dataset {str(root)!r} has {n} image; need at least 2 to split into train and validation")
    order = np.random.default_rng([cfg.seed, 7]).permutation(n)
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction)))
    return order[n_val:], order[:n_val]


def evaluation_set(cfg, data: str | None = None, split: str | None = None,
                   fingerprint: dict | None = None):
    """The dataset ``minideeplab evaluate`` scores, and a label saying what it is.

    ``data`` None (or the run's own folder, or a copy of it: same file names and sizes) means the run's data, where
    ``split`` "val" (the default) is exactly the validation set the run validated on, "train" its training images
    (not augmented) and "all" both. Another folder is scored whole by default ("all"), or by the split the run
    would have made of it. ``cfg`` gives the image size, the synthetic settings and the mask rule; ``fingerprint``
    is the run's ``dataset_fingerprint`` (from its checkpoint), to recognise a copy of its folder."""
    if split not in (None, "val", "train", "all"):
        raise ValueError(f"split must be 'val', 'train' or 'all', got {split!r}")
    if data is None and cfg.data not in SYNTHETIC_DATA and not Path(cfg.data).is_dir():
        raise ValueError(f"the run's data folder {cfg.data!r} is not there any more; name the data with --data")
    data = cfg.data if data is None else (data if data in SYNTHETIC_DATA else os.path.abspath(data))
    size = cfg.image_size
    if data in SYNTHETIC_DATA:
        variant = SYNTHETIC_DATA[data]
        sets = {"train": SyntheticShapes(cfg.train_size, size, seed=cfg.seed, split=0, variant=variant),
                "val": SyntheticShapes(cfg.val_size, size, seed=cfg.seed, split=1, variant=variant)}
        split = split or "val"
        what = f"SyntheticShapes{'' if variant == 'default' else f' ({variant})'} (seed {cfg.seed})"
    else:
        root, kw = Path(data), {"mask_void": cfg.mask_void}
        if (root / "train").is_dir() and (root / "val").is_dir():
            sets = {"train": FolderDataset(root / "train", size, **kw), "val": FolderDataset(root / "val", size, **kw)}
            split, what = split or "val", str(root)
        else:
            whole = FolderDataset(root, size, **kw)
            run_listing = ((fingerprint or {}).get("train") or {}).get("listing")
            own = data == cfg.data or whole.fingerprint()["listing"] == run_listing
            split = split or ("val" if own else "all")
            if split == "all":
                return whole, f"{root}: all {len(whole)} pairs, {size} px"
            train_idx, val_idx = folder_split(cfg, len(whole), root)
            chosen = val_idx if split == "val" else train_idx
            return Subset(whole, chosen), (f"{root}: the {'validation' if split == 'val' else 'training'} split "
                                           f"({len(chosen)} of {len(whole)} pairs, seed {cfg.seed}, val_fraction "
                                           f"{cfg.val_fraction}), {size} px")
    name = {"val": "validation", "train": "training", "all": "training + validation"}[split]
    dataset = ConcatDataset([sets["train"], sets["val"]]) if split == "all" else sets[split]
    return dataset, f"{what}: {name} images ({len(dataset)}), {size} px"


def dataset_fingerprint(train_set, val_set) -> dict:
    """What identifies a run's data, stored in its checkpoints (``Trainer.state_meta``): per set, the folder's
    file count, bytes and hashes of names + sizes and of contents (``FolderDataset.fingerprint``), or the
    synthetic set's size and seed."""
    def one(ds):
        base = getattr(ds, "dataset", ds)             # a Subset's folder
        if isinstance(base, FolderDataset):
            return {"folder": str(base.root), **base.fingerprint()}
        return {"synthetic": len(base), "seed": getattr(base, "seed", None), "size": getattr(base, "size", None)}
    return {"train": one(train_set), "val": one(val_set)}


def check_data_fingerprint(saved: dict | None, current: dict, path) -> None:
    """Refuse to resume the checkpoint ``path`` on data that changed since its run started (ValueError saying
    what changed). Checkpoints written before fingerprints existed (``saved`` None) are not checked."""
    if not saved:
        return
    for part in ("train", "val"):
        was, now = saved.get(part) or {}, current.get(part) or {}
        if was == now:
            continue
        if "listing" in was and was.get("listing") == now.get("listing"):
            change = "same file names and sizes, but different contents"
        elif "files" in was and (was.get("files"), was.get("bytes")) == (now.get("files"), now.get("bytes")):
            change = "as many files and bytes, but other names or sizes"
        elif "files" in was:
            change = (f"{was.get('files')} files ({was.get('bytes')} bytes) when the run started, now "
                      f"{now.get('files')} files ({now.get('bytes')} bytes)")
        else:
            change = f"{was} when the run started, now {now}"
        raise ValueError(f"cannot resume {str(path)!r}: its {'training' if part == 'train' else 'validation'} data "
                         f"{was.get('folder', '')} changed since the run started ({change}); resume with the "
                         "original data, or start a new run")
