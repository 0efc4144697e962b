"""`burnish train CONFIG.yaml`: read, check and override a run configuration.

A run file has four sections:

    model:     from_pretrained arguments (model_name is required)
    peft:      get_peft_model arguments; absent = full fine-tuning
    data:      train / eval dataset paths (.jsonl or .json)
    training:  TrainingConfig fields

Every key can be overridden from the command line (`--training.learning_rate
1e-4`). Unknown keys are errors that name the file, the line and the closest
valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import BurnishError

DATA_KEYS = ("train", "eval")


@dataclass
class RunConfig:
    model: dict
    peft: dict | None
    data: dict
    training: dict
    source: str


def _valid_keys() -> dict[str, set]:
    from .loading import UNSLOTH_NOOP_ARGS, from_pretrained
    from .peft import UNSLOTH_ARGS, get_peft_model
    from .trainer import TrainingConfig

    def params(fn, drop):
        return {n for n, p in inspect.signature(fn).parameters.items()
                if n not in drop and p.kind != p.VAR_KEYWORD}

    return {
        "model": params(from_pretrained, ()) | set(UNSLOTH_NOOP_ARGS),
        "peft": params(get_peft_model, ("model",)) | set(UNSLOTH_ARGS),
        "data": set(DATA_KEYS),
        "training": {f.name for f in dataclasses.fields(TrainingConfig)},
    }


def _coerce(value):
    """YAML 1.1 reads `1e-4` (no dot) as a string; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else int(value)
        except ValueError:
            return value
    return value


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, sorted(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of every `section` and `section.key` in the YAML text."""
    lines = {}
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key_node, value_node in root.value:
        section = key_node.value
        lines[section] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            for k, _ in value_node.value:
                lines[f"{section}.{k.value}"] = k.start_mark.line + 1
    return lines


def _parse_yaml(path: Path) -> tuple[dict, dict]:
    if not path.exists():
        raise BurnishError(f"{path}: config file not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "cannot parse"
        raise BurnishError(f"{where}: invalid YAML ({problem})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BurnishError(f"{path}:1: expected a mapping with sections "
                           "model, peft, data, training")
    return raw, lines


def _apply_overrides(raw: dict, overrides: list[str], valid: dict) -> None:
    """`--section.key value` pairs; values are parsed as YAML scalars."""
    i = 0
    while i < len(overrides):
        flag = overrides[i]
        if not flag.startswith("--") or "." not in flag:
            raise BurnishError(f"command line: expected --section.key VALUE, got '{flag}'")
        name, _, inline = flag[2:].partition("=")
        if inline:
            value, i = inline, i + 1
        elif i + 1 < len(overrides):
            value, i = overrides[i + 1], i + 2
        else:
            raise BurnishError(f"command line: {flag} needs a value")
        section, _, key = name.partition(".")
        if section not in valid:
            raise BurnishError(f"command line: unknown section '{section}' in {flag}"
                               f"{_suggest(section, valid)}")
        if key not in valid[section]:
            raise BurnishError(f"command line: unknown key '{section}.{key}'"
                               f"{_suggest(key, valid[section])}")
        try:
            parsed = _coerce(yaml.safe_load(value))
        except yaml.YAMLError:
            parsed = value
        if raw.get(section) is None:
            raw[section] = {}
        raw[section][key] = parsed


def load_run_config(path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    raw, lines = _parse_yaml(path)
    valid = _valid_keys()

    def where(key):
        return f"{path}:{lines[key]}" if key in lines else str(path)

    for section, body in raw.items():
        if section not in valid:
            raise BurnishError(f"{where(section)}: unknown section '{section}'"
                               f"{_suggest(str(section), valid)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise BurnishError(f"{where(section)}: section '{section}' must be a mapping")
        for key in body:
            if key not in valid[section]:
                raise BurnishError(f"{where(f'{section}.{key}')}: unknown key "
                                   f"'{section}.{key}'{_suggest(str(key), valid[section])}")
            body[key] = _coerce(body[key])
    _apply_overrides(raw, overrides or [], valid)
    model = dict(raw.get("model") or {})
    if "model_name" not in model:
        raise BurnishError(f"{where('model')}: model.model_name is required")
    data = dict(raw.get("data") or {})
    if "train" not in data:
        raise BurnishError(f"{where('data')}: data.train is required (a .jsonl or .json file)")
    base = path.parent
    for key in DATA_KEYS:
        if data.get(key) is not None:
            file = Path(data[key])
            file = file if file.is_absolute() else base / file
            if not file.exists():
                raise BurnishError(f"{where(f'data.{key}')}: data.{key}: file not found: {file}")
            data[key] = str(file)
    model_name = Path(str(model["model_name"])).expanduser()
    if not model_name.is_absolute() and (base / model_name).exists():
        model["model_name"] = str(base / model_name)
    peft = raw.get("peft")
    return RunConfig(model=model, peft=None if peft is None else dict(peft), data=data,
                     training=dict(raw.get("training") or {}), source=str(path))


def run(config: RunConfig, log=print, resume: bool = False) -> dict:
    """Load, (optionally) add adapters, train (from the latest checkpoint in
    output_dir with `resume`), save adapters or the model."""
    from .distributed import barrier
    from .export import save_adapters, save_merged
    from .loading import from_pretrained
    from .peft import get_peft_model
    from .trainer import Trainer, TrainingConfig

    training = TrainingConfig(**config.training)
    full = config.peft is None
    model_args = dict(config.model)
    model_args["full_finetuning"] = full or bool(model_args.get("full_finetuning"))
    model, tokenizer = from_pretrained(**model_args)
    if not full:
        model = get_peft_model(model, **config.peft)
    trainer = Trainer(model, tokenizer, config.data["train"],
                      eval_dataset=config.data.get("eval"), config=training)
    metrics = trainer.train(resume_from_checkpoint=True if resume else None)
    out = Path(training.output_dir)
    if trainer.world.is_main:  # several ranks: rank 0 saves, the others wait
        if full:
            saved = save_merged(model, tokenizer, out / "model")
        else:
            saved = save_adapters(model, out / "adapters")
        log(f"saved {'model' if full else 'adapters'} to {saved}")
    barrier(trainer.world)
    return metrics
