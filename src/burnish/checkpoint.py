"""Training checkpoints that resume exactly.

`output_dir/checkpoint-<step>/` holds everything the next step depends on:

    trainable.safetensors   the trainable parameters as the model holds them
    master.safetensors      float32 master weights (full fine-tuning of bf16/fp16)
    optimizer.safetensors   optimizer state (moments, step, learning rate)
    trainer_state.json      step, epoch and position in the epoch's batch plan,
                            pending log sums, MLX's random key (dropout),
                            the TrainingConfig
    adapter_config.json     for adapters: the checkpoint is also an mlx-lm
                            adapter folder (`adapters.safetensors`)

A checkpoint is written into a temporary folder and renamed into place, so a
crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .atomic import atomic_directory
from .errors import BurnishError, read_json

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


def checkpoint_dirs(output_dir) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = re.fullmatch(rf"{PREFIX}(\d+)", p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _save_tree(path: Path, tree) -> None:
    flat = dict(tree_flatten(tree))
    mx.save_safetensors(str(path), flat)


def _load_tree(path: Path):
    return tree_unflatten(list(mx.load(str(path)).items()))


def save_checkpoint(output_dir, *, step: int, trainable, optimizer_state, master,
                    trainer_state: dict, config: dict, adapter_config: dict | None,
                    adapter_weights: dict | None, save_total_limit: int | None) -> Path:
    path = Path(output_dir) / f"{PREFIX}{step}"
    with atomic_directory(path) as tmp:
        _save_tree(tmp / "trainable.safetensors", trainable)
        _save_tree(tmp / "optimizer.safetensors", optimizer_state)
        if master is not None:
            _save_tree(tmp / "master.safetensors", master)
        if adapter_config is not None:
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
            mx.save_safetensors(str(tmp / "adapters.safetensors"), adapter_weights,
                                metadata={"format": "mlx"})
        (tmp / STATE_FILE).write_text(json.dumps({
            "format_version": FORMAT_VERSION, "state": trainer_state, "config": config,
        }, indent=2))
    prune(output_dir, save_total_limit)
    return path


def prune(output_dir, save_total_limit: int | None) -> None:
    if not save_total_limit:
        return
    dirs = checkpoint_dirs(output_dir)
    for old in dirs[: max(0, len(dirs) - save_total_limit)]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(path) -> dict:
    """Everything a checkpoint holds, as arrays, trees and dicts."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise BurnishError(f"{path}: not a burnish checkpoint (no {STATE_FILE})")
    meta = read_json(path / STATE_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise BurnishError(f"{path / STATE_FILE}: unsupported checkpoint format "
                           f"{meta.get('format_version')!r}")
    return {
        "trainable": _load_tree(path / "trainable.safetensors"),
        "optimizer": _load_tree(path / "optimizer.safetensors"),
        "master": (_load_tree(path / "master.safetensors")
                   if (path / "master.safetensors").exists() else None),
        "state": meta["state"],
        "config": meta["config"],
    }


def resolve_resume(resume_from_checkpoint, output_dir) -> Path | None:
    """`True` = latest in output_dir (None if there is none); a path = that one."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise BurnishError(f"resume_from_checkpoint: {path}: no such checkpoint folder")
    return path
