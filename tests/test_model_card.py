"""final/README.md: the model card a finished run writes (full model and LoRA adapter), the
card `trainer export` writes, and `trainer export --push-to-hub` up to the upload."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_run_config, reset_accelerate
from huggingface_hub import ModelCard

import trainer.run.train
from trainer.cli import main
from trainer.model.card import CardFacts, model_card


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def scores(card: ModelCard) -> dict[str, float]:
    """The card's model-index metrics, by name."""
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The scores in eval_results.json (its per-class lists and step numbers left out)."""
    results = json.loads((run_dir / "eval_results.json").read_text())
    return {k: v for k, v in results.items() if isinstance(v, float)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models_by_task, data_dir):
    """`finished(name, task, **sections)`: a tiny run trained once per module (its run dir)."""
    runs: dict[str, Path] = {}

    def run(name: str, task: str, **sections) -> Path:
        if name not in runs:
            folder = tmp_path_factory.mktemp(name)
            config = make_run_config(folder, task, tiny_models_by_task, data_dir, **sections)
            assert cli("train", config) == 0
            runs[name] = folder / "run"
        return runs[name]

    return run


def test_a_full_model_run_leaves_a_card_the_hub_parses(finished, data_dir, tiny_bert):
    run_dir = finished("full", "classification", train={"max_steps": 3})
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.tags == ["steadytrain", "classification"]
    assert card.data.base_model is None  # a local folder: the Hub takes ids only
    assert f"fine-tuned from `{tiny_bert}`" in card.text
    assert scores(card) == final_metrics(run_dir) and "accuracy" in scores(card)
    (result,) = {(r.dataset_name, r.dataset_split) for r in card.data.eval_results}
    assert result == ("sentiment_validation.csv", "validation")
    assert f"| `{data_dir / 'sentiment_train.csv'}` | train | 192 |" in card.text
    assert f"| `{data_dir / 'sentiment_validation.csv'}` | validation | 48 |" in card.text
    assert (run_dir / "config.yaml").read_text() in card.text  # the resolved config
    assert f'pipeline("text-classification", model="{run_dir / "final"}")' in card.text


def test_a_lora_run_leaves_a_peft_card(finished, tiny_bert):
    run_dir = finished("lora", "token-classification", peft={"method": "lora"})
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "token-classification"
    assert card.data.tags == ["steadytrain", "token-classification", "lora"]
    assert scores(card) == final_metrics(run_dir) and "f1" in scores(card)
    assert "PeftModel.from_pretrained(base, " in card.text
    assert f'AutoModelForTokenClassification.from_pretrained("{tiny_bert}", id2label=' in card.text


def card_of(config: dict, results: dict | None = None, library: str = "transformers"):
    facts = CardFacts(config, results, None, library)
    return ModelCard(str(model_card(facts, "me/tiny", "tiny")))  # parsed back, as the Hub does


def test_hub_ids_are_metadata_and_local_paths_are_not(tmp_path):
    config = {
        "task": "classification",
        "model": {"name_or_path": "google-bert/bert-base-uncased"},
        "data": {
            "train": ["stanfordnlp/imdb", str(tmp_path / "extra.csv")],
            "validation": "stanfordnlp/imdb:test",
        },
    }
    card = card_of(config, {"accuracy": 0.9, "loss": 0.3, "best_step": 4, "metric": "accuracy"})
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.datasets == ["stanfordnlp/imdb"]
    (result,) = {(r.dataset_type, r.dataset_split) for r in card.data.eval_results}
    assert result == ("stanfordnlp/imdb", "test")
    assert scores(card) == {"accuracy": 0.9, "loss": 0.3}


def test_the_license_comes_from_the_base_models_own_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    config = {"task": "mlm", "model": {"name_or_path": str(base)}, "data": {"train": "a.txt"}}
    assert card_of(config).data.license is None
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    assert card_of(config).data.license == "mit"
    assert (
        card_of({**config, "model": {"name_or_path": str(base), "from_scratch": True}}).data.license
        is None
    )


def test_a_kill_before_the_card_leaves_a_finish_the_restart_completes(run_config, tmp_path, capfd):
    config, run_dir = run_config("classification", train={"max_steps": 3}), tmp_path / "run"

    def killed(folder, card):
        raise KeyboardInterrupt  # a SIGKILL stand-in: eval_results.json is written, no card

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.run.train, "write_card", killed)
        with pytest.raises(KeyboardInterrupt):
            cli("train", config)
    assert (run_dir / "eval_results.json").is_file() and (run_dir / "best").is_dir()
    assert not (run_dir / "final").exists(), "final/ appears only with its card"
    capfd.readouterr()
    assert cli("train", config) == 0
    assert (
        f"completed the interrupted finish of {run_dir}: best/ is final/" in capfd.readouterr().err
    )
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert scores(card) == final_metrics(run_dir) and card.data.library_name == "transformers"


# --- trainer export -----------------------------------------------------------------------


def test_exports_carry_a_card_for_the_library_that_loads_them(finished, tmp_path):
    run_dir = finished("lora-classification", "classification", peft={"method": "lora"})
    assert cli("export", run_dir, "--out", tmp_path / "adapter") == 0
    assert cli("export", run_dir, "--merge", "--out", tmp_path / "merged") == 0
    adapter = ModelCard.load(tmp_path / "adapter" / "README.md")
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert (adapter.data.library_name, merged.data.library_name) == ("peft", "transformers")
    assert scores(adapter) == scores(merged) == final_metrics(run_dir)
    assert adapter.data.tags == merged.data.tags == ["steadytrain", "classification", "lora"]
    assert f'pipeline("text-classification", model="{tmp_path / "merged"}")' in merged.text
    assert f'PeftModel.from_pretrained(base, "{tmp_path / "adapter"}")' in adapter.text
    assert "id2label={0: 'negative', 1: 'positive'}" in adapter.text


def test_a_full_model_exports_as_a_copy_with_its_card(finished, tmp_path):
    run_dir = finished("full", "classification", train={"max_steps": 3})
    assert cli("export", run_dir, "--out", tmp_path / "copy") == 0
    copy = tmp_path / "copy"
    assert (copy / "model.safetensors").read_bytes() == (
        run_dir / "final" / "model.safetensors"
    ).read_bytes()
    card = ModelCard.load(copy / "README.md")
    assert card.data.library_name == "transformers" and scores(card) == final_metrics(run_dir)
    assert f'model="{copy}"' in card.text
    assert not list(tmp_path.glob("copy.tmp"))


# --- trainer export --push-to-hub -----------------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    """A logged-in, online hub whose create_repo and upload_folder only record their
    arguments (and what the folder held when it was uploaded)."""
    import huggingface_hub.constants
    from huggingface_hub import HfApi, RepoUrl

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **options):
        calls.append(("create_repo", {"repo_id": repo_id, **options}))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, **options):
        folder = Path(options["folder_path"])
        files = {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }
        calls.append(("upload_folder", {**options, "files": files}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    return calls


def test_push_to_hub_uploads_the_adapter_with_its_card(finished, hub, tiny_bert, capsys):
    run_dir = finished("lora-classification", "classification", peft={"method": "lora"})
    capsys.readouterr()
    assert cli("export", run_dir, "--push-to-hub", "me/tiny-sentiment", "--private") == 0
    (_, created), (_, uploaded) = hub
    assert created == {"repo_id": "me/tiny-sentiment", "exist_ok": True, "private": True}
    assert uploaded["repo_id"] == "me/tiny-sentiment"
    files = uploaded["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert not any(name.startswith("base/") for name in files), "base/ names local files"
    adapter = json.loads(files["adapter_config.json"])
    assert adapter["base_model_name_or_path"] == str(tiny_bert), "the base it was trained on"
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and scores(card) == final_metrics(run_dir)
    assert 'PeftModel.from_pretrained(base, "me/tiny-sentiment")' in card.text
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pushed"] == "https://huggingface.co/me/tiny-sentiment"


def test_push_to_hub_with_out_keeps_the_folder_it_pushed(finished, hub, tmp_path):
    run_dir = finished("full", "classification", train={"max_steps": 3})
    assert cli("export", run_dir, "--out", tmp_path / "pushed", "--push-to-hub", "tiny") == 0
    (_, created), (_, uploaded) = hub
    assert created["private"] is False and uploaded["folder_path"] == tmp_path / "pushed"
    assert uploaded["files"]["README.md"] == (tmp_path / "pushed" / "README.md").read_bytes()
    assert uploaded["repo_id"] == "me/tiny", "a bare name is in the token's namespace"
    assert 'model="me/tiny"' in uploaded["files"]["README.md"].decode()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--push-to-hub", "me/bad//id"], "--push-to-hub: 'me/bad//id' is not a repo id: "),
        (
            ["--push-to-hub", "me/x", "--no-token"],
            "--push-to-hub: no Hugging Face token: log in with `hf auth login`",
        ),
        (["--push-to-hub", "me/x", "--offline"], "--push-to-hub: HF_HUB_OFFLINE=1 keeps this"),
        (["--private"], "--private: makes the repo of --push-to-hub private"),
        ([], "export: name where it goes: --out DIR, --push-to-hub REPO_ID, or both"),
    ],
)
def test_a_push_that_cannot_succeed_is_one_line_before_any_work(
    argv, expected, finished, hub, monkeypatch, capsys
):
    run_dir = finished("full", "classification", train={"max_steps": 3})
    if "--no-token" in argv:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_HOME", str(run_dir / "no-hf-home"))  # no token file either
    if "--offline" in argv:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = [a for a in argv if a not in ("--no-token", "--offline")]
    capsys.readouterr()
    assert cli("export", run_dir, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert hub == [], "nothing reached the hub"


def _refused() -> Exception:
    from huggingface_hub.errors import HfHubHTTPError

    response = SimpleNamespace(status_code=403, headers={}, request=None)
    return HfHubHTTPError("403 Forbidden: you may not write to me/x", response=response)


def _unreachable() -> Exception:
    from huggingface_hub.errors import HTTPError  # what a failed connection raises

    return HTTPError("[Errno -2] Name or service not known")


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (_refused, "403 Forbidden: you may not write to me/x; the token may not write to me/x"),
        (_unreachable, "[Errno -2] Name or service not known; check the network"),
    ],
    ids=["refused", "unreachable"],
)
def test_a_failed_push_says_what_to_do(failure, expected, finished, hub, monkeypatch, capsys):
    from huggingface_hub import HfApi

    def create_repo(self, repo_id, **options):
        raise failure()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    run_dir = finished("full", "classification", train={"max_steps": 3})
    capsys.readouterr()
    assert cli("export", run_dir, "--push-to-hub", "me/x") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --push-to-hub: could not push to me/x: {expected}"), err
    assert "hf auth login" in err and "HF_TOKEN" in err and err.count("\n") == 1
