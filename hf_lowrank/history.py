"""The rank history of a training run: `lowrank_history.json` beside a saved model.

`{"method": ..., "config": {...}, "history": [{"step", "event", "ranks": {layer: rank}, "params",
"dense_params", "trainable_params"}, ...]}`. The controller writes it; cards and plots read it.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

HISTORY_NAME = "lowrank_history.json"


def save_rank_history(directory: Union[str, os.PathLike], method: str, config: dict, records: list[dict]) -> str:
    """Write `lowrank_history.json` into `directory`; returns its path."""
    path = os.path.join(directory, HISTORY_NAME)
    with open(path, "w") as f:
        json.dump({"method": method, "config": config, "history": records}, f)
    return path


def remove_rank_history(directory: Union[str, os.PathLike]) -> None:
    """Delete a stale `lowrank_history.json` (a dense run writing into a folder an earlier low-rank run used)."""
    path = os.path.join(directory, HISTORY_NAME)
    if os.path.isfile(path):
        os.remove(path)


def load_rank_history(source: Union[str, os.PathLike, dict, list, None]) -> Optional[dict]:
    """The rank history of a training run, or `None` when there is none.

    `source` is a directory holding `lowrank_history.json`, the JSON file itself, or an already loaded dict.
    A bare list of records is accepted too. Raises `ValueError` when the file exists but is not a rank history.
    """
    if source is None:
        return None
    if isinstance(source, (dict, list)):
        data = source
    else:
        path = str(source)
        if os.path.isdir(path):
            path = os.path.join(path, HISTORY_NAME)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); delete it or rewrite it from the run.") from None
    if isinstance(data, list):
        data = {"history": data}
    records = data.get("history") if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "step" in r and isinstance(r.get("ranks"), dict) for r in records
    ):
        raise ValueError(f"{source!r} is not a rank history: expected {{'history': [{{'step': int, 'ranks': "
                         "{layer: rank}, ...}, ...]}.")
    return data
