"""model.revision: the weights, config and tokenizer all come from the revision named, it is
recorded in the run config, and an adapter remembers the revision of its base."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForMaskedLM

from trainer.config import PeftConfig, build_config, dump_yaml
from trainer.model.adapters import attach_adapter
from trainer.model.saved import SavedModel
from trainer.tasks.registry import TASKS

REPO_ID = "tiny/bert"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def hub_cache(tiny_bert: Path, root: Path) -> dict[str, dict]:
    """An offline hub cache ($HF_HOME/hub) holding REPO_ID at two revisions that differ in
    weights, config and tokenizer; returns what each revision holds."""
    repo = root / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    facts = {}
    for number, (name, commit) in enumerate(COMMITS.items()):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_bert, snapshot)
        (repo / "refs" / name).write_text(commit)
        model = AutoModelForMaskedLM.from_pretrained(snapshot)
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight.add_(number)
        model.config.hidden_dropout_prob = 0.1 + number / 10
        model.save_pretrained(snapshot)
        settings = json.loads((snapshot / "tokenizer_config.json").read_text())
        settings["model_max_length"] = 100 + number
        (snapshot / "tokenizer_config.json").write_text(json.dumps(settings))
        facts[name] = {
            "dropout": model.config.hidden_dropout_prob,
            "max_length": 100 + number,
            "embedding_sum": round(model.bert.embeddings.word_embeddings.weight.sum().item(), 3),
        }
    return facts


LOAD_EACH = """
import json, sys
from trainer.config import ModelConfig
from trainer.model.load import load_model, load_model_config, load_tokenizer
from trainer.tasks.registry import TASKS
spec, seen = TASKS["mlm"], {}
for revision in (None, "v1"):
    cfg = ModelConfig(name_or_path=sys.argv[1], revision=revision)
    tokenizer = load_tokenizer(cfg, spec)
    model = load_model(cfg, spec, tokenizer)
    seen[str(revision)] = {
        "dropout": load_model_config(cfg, None).hidden_dropout_prob,
        "max_length": tokenizer.model_max_length,
        "embedding_sum": round(model.get_input_embeddings().weight.sum().item(), 3),
    }
print(json.dumps(seen))
"""


def load_in_subprocess(script: str, env: dict) -> subprocess.CompletedProcess:
    """Run `script` on REPO_ID in a process of its own (the hub's settings are read at
    import), asserting that it succeeded."""
    result = subprocess.run(
        [sys.executable, "-c", script, REPO_ID],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow  # a subprocess, for an offline hub cache of its own: ~8 s
def test_weights_config_and_tokenizer_come_from_the_revision(tiny_bert, tmp_path):
    facts = hub_cache(tiny_bert, tmp_path / "hf")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = load_in_subprocess(LOAD_EACH, env)
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == {"None": facts["main"], "v1": facts["v1"]}
    assert facts["main"] != facts["v1"]


def test_the_revision_is_recorded_and_an_adapter_keeps_its_base_revision(tiny_bert, tmp_path):
    raw = {"task": "mlm", "model": {"name_or_path": str(tiny_bert), "revision": "v1"}}
    cfg = build_config(raw, for_training=False)
    assert "  revision: v1\n" in dump_yaml(cfg)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    lora = attach_adapter(model, PeftConfig(method="lora"), TASKS["mlm"], False, revision="v1")
    lora.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "config.json").write_text(model.config.to_json_string())
    saved = SavedModel.read(tmp_path / "adapter")
    assert saved.base_revision == "v1"
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["revision"] == (
        "v1"
    )
    # the folder itself is local: a run config read from it asks for no revision of it
    assert saved.run_config(["task=mlm"]).model.revision is None
