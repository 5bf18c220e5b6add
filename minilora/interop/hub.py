"""Hugging Face hub ids as model folders: ``load_model("gpt2")``, ``--base gpt2`` and
``--base org/name`` resolve, as transformers and PEFT do, through huggingface_hub's cache.

A local file or folder always wins: a name is looked up on the hub only when no such path
exists and it has a hub id's form (``name`` or ``org/name``). The lookup needs the optional
``hub`` extra (``pip install -e ".[hub]"`` in a clone, the ``huggingface_hub`` package), which
downloads only the files minilora reads into its cache (``$HF_HOME/hub``, or
``$HF_HUB_CACHE``) and, with ``HF_HUB_OFFLINE=1``, never touches the network: a model
cached before is found there. Both variables are read by huggingface_hub when it is first
imported. Without the extra, or offline without a cached copy, one line says what to do.
Guide: docs/text.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The files minilora reads from a hub model: load_model's two and the command's tokenizer.
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json"]

# A hub id: a name, or an organisation and a name, of letters, digits, "_", "-" and "."
# (huggingface_hub's own check refuses the rarer bad forms, such as "--" or "..").
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
_INSTALL = 'pip install -e ".[hub]" in a clone of minilora'


def is_hub_id(name) -> bool:
    """Whether ``name`` may name a hub model: a ``str`` of the form ``name`` or ``org/name``
    that does not end in ``.safetensors`` (a model file, never a hub id)."""
    return (
        isinstance(name, str)
        and _HUB_ID.fullmatch(name) is not None
        and not name.endswith(".safetensors")
    )


def local_path(name, caller: str) -> Path:
    """``name`` as a path on this machine: itself when it exists or is no hub id, else the
    folder of the hub model ``name`` in huggingface_hub's cache (downloaded there first,
    unless ``HF_HUB_OFFLINE`` is set). ``caller`` starts every message."""
    if os.path.lexists(name) or not is_hub_id(name):
        return Path(name)
    not_local = f"{caller}: {name} is not a local file or folder"
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ValueError(
            f"{not_local}; to load the Hugging Face hub model {name}, install huggingface_hub "
            f"({_INSTALL}), or give a folder saved with save_pretrained"
        ) from None
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:  # not cached (or in part), and no network
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set: run once without it to download the model"
        else:
            why = f"the hub could not be reached ({_cause(e)}): connect to download the model"
        raise ValueError(
            f"{not_local}, nor a model in the Hugging Face cache {cache}, and {why}, or give "
            "a local folder"
        ) from None
    except HfHubHTTPError as e:  # no such repository, a private one, the hub down
        raise ValueError(
            f"{not_local}, and the Hugging Face hub refused the model {name} ({_cause(e)}); "
            "check the name, or give a local folder"
        ) from None


def _cause(error: BaseException) -> str:
    """The root of an error chain, as one short line: its class and first line."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
