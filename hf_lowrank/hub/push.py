"""Uploading a low-rank model with its card.

`PreTrainedModel.push_to_hub` writes a generic card over README.md (it loads the remote or default card and
saves it over the one in its temporary folder), so a card we wrote would never survive it. `push_to_hub` here
does the upload itself: `save_for_use` (the smallest form) into a temporary folder, our card and plots beside the
weights, then `HfApi.create_repo(exist_ok=True)` and one `HfApi.upload_folder` commit.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from typing import Optional, Union

from torch import nn

from ..history import HISTORY_NAME, load_rank_history
from ..serialization import to_use_form
from .card import CARD_NAME, DIAGNOSTIC_PLOTS, make_model_card
from .loading import copy_processor_files, is_regular_file, load_pretrained_dir

logger = logging.getLogger(__name__)


OFFLINE_MESSAGE = ("The Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1): nothing "
                   "was uploaded. Unset it to push, or keep the model local with model.save_pretrained(DIR) and "
                   "hf_lowrank.hub.save_model_card(DIR).")


def _check_online() -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(OFFLINE_MESSAGE)


def push_to_hub(
    model: Union[nn.Module, str, os.PathLike],
    repo_id: str,
    *,
    processing_class=None,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    api=None,
    **card_kwargs,
):
    """Upload a low-rank model to the Hub with its model card, in one commit.

    `api.create_repo(repo_id, exist_ok=True)` first (a bare name lands in the token owner's namespace, and the
    card names the full id); then the weights and config in their smallest form (`to_use_form` of a copy), the
    tokenizer or processor, `lowrank_history.json` when known, the card (`README.md`, see `make_model_card`) and
    its plots are staged in a temporary folder and sent with one `api.upload_folder(...)`. Unlike
    `model.push_to_hub`, no generic card replaces ours.

    Args:
        model: the model, or a directory it was saved in (then its processor files, rank history, results
            and diagnostics plots are taken from there too).
        repo_id: `"user/name"` (or a bare `"name"`, in the token owner's namespace).
        processing_class: a tokenizer / processor (saved with its `save_pretrained`), or a directory whose
            tokenizer / processor files are copied.
        token: Hub token (default: the logged-in one). Used only for the two API calls; never logged or
            written into the card.
        private, commit_message, revision, create_pr: as in `HfApi.upload_folder` / `create_repo`.
        api: an `HfApi` (default `HfApi()`); inject one to point elsewhere or to test.
        card_kwargs: passed to `make_model_card` (`base_model`, `datasets`, `eval_results`, `source_dir`, ...).

    Returns the `CommitInfo` of the upload. Raises `huggingface_hub.errors.OfflineModeIsEnabled` before
    anything is written or sent when offline mode is set.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    _check_online()
    if isinstance(model, (str, os.PathLike)):
        directory = str(model)
        model = load_pretrained_dir(directory)
        processing_class = directory if processing_class is None else processing_class
        card_kwargs.setdefault("source_dir", directory)
    api = api if api is not None else HfApi()
    source_dir = card_kwargs.get("source_dir")
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    except OfflineModeIsEnabled as err:
        raise OfflineModeIsEnabled(OFFLINE_MESSAGE) from err
    if "/" not in repo_id and isinstance(getattr(url, "repo_id", None), str):
        repo_id = url.repo_id  # "name" -> "owner/name": uploads and the card's loading snippet need the full id
    with tempfile.TemporaryDirectory(prefix="hf_lowrank_push_") as staging:
        # What is published is the smallest form (Σ folded into the bases), and the card describes that form.
        model = to_use_form(copy.deepcopy(model))
        model.save_pretrained(staging)
        if isinstance(processing_class, (str, os.PathLike)):
            copy_processor_files(processing_class, staging)
        elif processing_class is not None:
            processing_class.save_pretrained(staging)
        history = card_kwargs.pop("history", None)
        if history is None and source_dir is not None and is_regular_file(os.path.join(source_dir, HISTORY_NAME)):
            history = source_dir  # a symlinked history could point anywhere: only a regular file is read
        history = load_rank_history(history)
        if history is not None:
            with open(os.path.join(staging, HISTORY_NAME), "w") as f:
                json.dump(history, f)
        if source_dir is not None:
            for name, _, _ in DIAGNOSTIC_PLOTS:
                if is_regular_file(os.path.join(source_dir, name)):  # never follow a symlink out of the folder
                    shutil.copy2(os.path.join(source_dir, name), staging)
        card = make_model_card(model, output_dir=staging, repo_id=repo_id, history=history, **card_kwargs)
        card.save(os.path.join(staging, CARD_NAME))
        staged = sorted(os.listdir(staging))
        try:
            info = api.upload_folder(repo_id=repo_id, folder_path=staging, token=token, revision=revision,
                                     create_pr=create_pr,
                                     commit_message=commit_message or "Upload low-rank model (hf_lowrank)")
        except OfflineModeIsEnabled as err:
            raise OfflineModeIsEnabled(OFFLINE_MESSAGE) from err
    logger.info("Uploaded %s to %s", ", ".join(staged), repo_id)
    return info
