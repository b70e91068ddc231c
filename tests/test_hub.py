"""An unreachable hub costs one quick probe, not minutes of retries: a cached model loads
at once and a missing one is one line (trainer/model/hub.py)."""

from __future__ import annotations

import json
import os

import pytest
from test_revision import hub_cache, load_in_subprocess

LOAD = """
import json, sys
from trainer.config import ModelConfig
from trainer.errors import UserError
from trainer.model.load import load_model, load_tokenizer
from trainer.tasks.registry import TASKS
spec = TASKS["mlm"]
cfg = ModelConfig(name_or_path=sys.argv[1])
model = load_model(cfg, spec, load_tokenizer(cfg, spec))
try:
    load_tokenizer(ModelConfig(name_or_path="tiny/absent"), spec)
except UserError as err:
    print(json.dumps({"params": model.num_parameters(), "absent": str(err)}))
"""


@pytest.mark.slow  # a subprocess with a hub cache and environment of its own: ~8 s
def test_an_unreachable_hub_is_asked_once_and_the_cache_serves(tiny_bert, tmp_path):
    hub_cache(tiny_bert, tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    # nothing listens on port 9 of this host: refused at once, as a firewalled hub would be
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = load_in_subprocess(LOAD, env)
    assert "Retrying" not in result.stderr, "huggingface_hub retried the hub"
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["params"] > 0
    assert seen["absent"] == (
        "model.name_or_path: 'tiny/absent' is neither a local folder nor in the hub cache, and "
        "the hub (127.0.0.1) is unreachable: Connection refused (HF_HUB_OFFLINE=1 skips the "
        "hub; on a node without internet, download the model first and name its folder)"
    )
