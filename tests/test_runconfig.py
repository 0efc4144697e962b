"""`burnish train CONFIG.yaml`: config checking, overrides, one-line errors."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from burnish.errors import BurnishError
from burnish.runconfig import load_run_config


def write_config(folder, model_path, body=None):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(8)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = body or f"""
model:
  model_name: {model_path}
  max_seq_length: 128
peft:
  r: 4
  lora_alpha: 8
data:
  train: train.jsonl
training:
  output_dir: {folder / 'out'}
  max_steps: 3
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  logging_steps: 1
"""
    path = folder / "run.yaml"
    path.write_text(text)
    return path


def test_overrides_and_paths(model_factory, tmp_path):
    path = write_config(tmp_path, model_factory("llama", mx.float32))
    cfg = load_run_config(path, ["--training.learning_rate", "1e-4",
                                 "--peft.r=8", "--training.packing", "true"])
    assert cfg.training["learning_rate"] == 1e-4
    assert cfg.peft["r"] == 8 and cfg.training["packing"] is True
    assert cfg.data["train"] == str(tmp_path / "train.jsonl")


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.replace("learning_rate:", "learnin_rate:"),
     "run.yaml:14: unknown key 'training.learnin_rate' (did you mean 'learning_rate'?)"),
    (lambda t: t.replace("peft:", "pfet:"),
     "run.yaml:5: unknown section 'pfet' (did you mean 'peft'?)"),
    (lambda t: t.replace("train: train.jsonl", "train: nothere.jsonl"),
     "run.yaml:9: data.train: file not found"),
    (lambda t: t.replace("  r: 4", "  r: [4"),
     "run.yaml:7: invalid YAML"),
])
def test_bad_configs_name_file_line_and_key(model_factory, tmp_path, mutate, message):
    path = write_config(tmp_path, model_factory("llama", mx.float32))
    path.write_text(mutate(path.read_text()))
    with pytest.raises(BurnishError) as err:
        load_run_config(path)
    assert message in str(err.value)


def test_unknown_override_suggests(model_factory, tmp_path):
    path = write_config(tmp_path, model_factory("llama", mx.float32))
    with pytest.raises(BurnishError, match=r"unknown key 'training.lr'"):
        load_run_config(path, ["--training.lr", "1"])
    with pytest.raises(BurnishError, match=r"did you mean 'max_steps'"):
        load_run_config(path, ["--training.max_step", "1"])


@pytest.mark.parametrize("case", ["bad_yaml", "unknown_key", "missing_data"])
def test_cli_train_errors_exit_2_one_line(model_factory, tmp_path, case):
    path = write_config(tmp_path, model_factory("llama", mx.float32))
    text = path.read_text()
    text = {"bad_yaml": text.replace("  r: 4", "  r: [4"),
            "unknown_key": text.replace("max_steps", "max_stepz"),
            "missing_data": text.replace("train.jsonl\n", "gone.jsonl\n")}[case]
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("burnish: error:"), proc.stderr
    assert "run.yaml:" in lines[0]


def test_cli_train_end_to_end(model_factory, tmp_path):
    from mlx_lm import load as mlx_load

    base = model_factory("llama", mx.float32)
    path = write_config(tmp_path, base)
    proc = subprocess.run([sys.executable, "-m", "burnish.cli", "train", str(path),
                           "--training.max_steps", "4", "--training.save_steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert "steps=4" in proc.stdout
    assert (out / "adapters" / "adapters.safetensors").exists()
    assert (out / "checkpoint-4").is_dir() and (out / "loss.png").exists()
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    model, _ = mlx_load(str(base), adapter_path=str(out / "adapters"))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 384)


def test_cli_train_resume_continues_from_the_latest_checkpoint(model_factory, tmp_path):
    base = model_factory("llama", mx.float32)
    path = write_config(tmp_path, base)
    cmd = [sys.executable, "-m", "burnish.cli", "train", str(path), "--training.save_steps", "2"]
    first = subprocess.run(cmd + ["--training.max_steps", "2"], capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd + ["--training.max_steps", "4", "--resume"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    records = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # the resumed run appended steps 3-4 after the first run's 1-2
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
