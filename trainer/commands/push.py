"""`trainer export --push-to-hub REPO_ID`: the exported folder, its model card included,
uploaded to a Hub model repo by huggingface_hub (`create_repo` + `upload_folder`, which
hash, deduplicate and send the large files through the Hub's own storage).

Whatever can stop a push (a bad repo id, no token, offline mode, a refused or failed
request) is the user's to fix: one line naming what to do, exit 2. The repo id and the
login are checked before anything is exported, so that a merge is not done for nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from trainer.commands.export import Destination, export
from trainer.errors import UserError

T = TypeVar("T")
LOGIN = "`hf auth login` (`huggingface-cli login` in older huggingface_hub) or set HF_TOKEN"


def check_push(repo_id: str) -> None:
    """Refuse, before any work, a push that cannot succeed: a malformed repo id, offline
    mode, no token."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"--push-to-hub: {repo_id!r} is not a repo id: {reason}") from None
    if constants.is_offline_mode():
        raise UserError(
            "--push-to-hub: HF_HUB_OFFLINE=1 keeps this process off the hub; unset it to push"
        )
    if get_token() is None:
        raise UserError(f"--push-to-hub: no Hugging Face token: log in with {LOGIN}")


def _hub_call(call: Callable[..., T], **options) -> T:
    """One hub request about `options["repo_id"]`; a refused or failed one is one line
    saying what to do."""
    try:
        return call(**options)
    except (HTTPError, OSError) as err:  # OSError: offline mode, a token file, a read
        raise UserError(_failed(options["repo_id"], err)) from None


def _failed(repo_id: str, err: Exception) -> str:
    """The one line a refused or failed push ends with, and what to do about it."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    status = err.response.status_code if isinstance(err, HfHubHTTPError) else None
    if status in (401, 403):
        advice = f"the token may not write to {repo_id}: log in with a write token, {LOGIN}"
    else:
        advice = f"check the network, or log in again: {LOGIN}"
    return f"--push-to-hub: could not push to {repo_id}: {reason}; {advice}"


def export_to_hub(
    run_or_model_dir: str,
    repo_id: str,
    private: bool,
    merge: bool,
    checkpoint: str | None = None,
    out: str | None = None,
) -> dict:
    """`trainer export RUN --push-to-hub REPO_ID`: create the repo if need be (its privacy
    stays as it is when it exists; first, so that the token is proven before a merge, and
    a bare NAME gets the namespace the card names), export as the hub holds it (into `out`
    when given, else into a temporary folder), and upload that folder as one commit.
    Returns the export's summary with the repo's URL."""
    check_push(repo_id)
    api = HfApi()
    repo = _hub_call(api.create_repo, repo_id=repo_id, exist_ok=True, private=private)
    with tempfile.TemporaryDirectory(prefix="trainer-push-") as scratch:
        folder = Path(out) if out else Path(scratch) / "export"
        to = Destination.hub(folder, repo.repo_id)
        summary = export(run_or_model_dir, to, merge, checkpoint)
        message = "Upload model trained with steadytrain"
        upload = {"repo_id": repo.repo_id, "folder_path": folder, "commit_message": message}
        _hub_call(api.upload_folder, **upload)
    summary["pushed"] = str(repo)
    if out is None:
        summary["out"] = None  # the temporary folder is gone
    return summary
