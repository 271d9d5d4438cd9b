"""The tokenizer that goes with a model: the one saved beside it, or `--tokenizer NAME_OR_DIR` (a directory, or
a hub name looked up in the local cache first); never remote code. Outputs carry the tokenizer that was used,
so that later commands on them need no flag."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from torch import nn

from .compaction import TOKENIZER_FILES
from .errors import ModelLoadError
from .hub import hub_offline_flag, hub_unreachable

TOKENIZER_FIX = "pass --tokenizer NAME_OR_DIR (a directory or hub name of its base checkpoint's tokenizer)"


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or Path(name).is_absolute()


def load_tokenizer(model_dir, model: Optional[nn.Module] = None, tokenizer: Optional[str] = None):
    """The tokenizer for a model (AutoTokenizer, never remote code): from `tokenizer` when given (a local
    directory first; a hub name only when it is not a local path), else the one saved in `model_dir`. A clear
    error when there is none, or when its vocabulary does not fit `model`'s embeddings."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        name = str(tokenizer)
        local = Path(name).expanduser()
        if local.exists():
            if not local.is_dir() or not _has_tokenizer_files(local):
                raise ModelLoadError(f"--tokenizer {name}: no tokenizer files there (none of "
                                     f"{', '.join(TOKENIZER_FILES)}); give a tokenizer directory or hub name")
            where = str(local)
        elif _looks_like_path(name):
            raise ModelLoadError(f"--tokenizer {name}: no such directory")
        else:
            return _check_vocab(_hub_tokenizer(name), model, f"--tokenizer {name}")
    else:
        model_dir = Path(model_dir)
        if not _has_tokenizer_files(model_dir):
            raise ModelLoadError(f"{model_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
                                 f"{TOKENIZER_FIX}")
        where, name = str(model_dir), None
    try:
        loaded = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for broken files
        what = f"--tokenizer {name}" if name is not None else f"the tokenizer in {where}"
        raise ModelLoadError(f"cannot load {what}: {_first_line(e)}") from e
    return _check_vocab(loaded, model, f"--tokenizer {name}" if name else f"in {where}")


def _check_vocab(tokenizer, model: Optional[nn.Module], what: str):
    if model is not None:
        vocab = model.base_model.config.vocab_size
        if len(tokenizer) > vocab:
            raise ModelLoadError(f"the tokenizer {what} has {len(tokenizer)} tokens, the model's embeddings only "
                                 f"{vocab}: they do not belong together")
    return tokenizer


def _hub_tokenizer(name: str):
    """A tokenizer by hub name: from the local Hugging Face cache, else downloaded; offline, one clear error
    at once (no minute of retries)."""
    import logging

    from transformers import AutoTokenizer

    with contextlib.suppress(Exception):  # the cache first: works offline
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    fix = "pass a local tokenizer directory to --tokenizer"
    flag = hub_offline_flag()
    if flag:
        raise ModelLoadError(f"--tokenizer {name}: not a local directory nor in the Hugging Face cache, and {flag} "
                             f"is set: {fix}")
    why = hub_unreachable(path=f"/api/models/{name}")
    if why is not None:
        raise ModelLoadError(f"--tokenizer {name}: not a local directory nor in the Hugging Face cache, and the hub "
                             f"is unreachable ({why}): {fix}")
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)  # no retry chatter: the error below says it in one line
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:  # not found, gated, unreachable
        raise ModelLoadError(f"cannot load --tokenizer {name} from the hub: {_first_line(e)}; {fix}") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def tokenizer_dir_for_outputs(stack: contextlib.ExitStack, tokenizer, source: Path) -> Path:
    """The directory whose tokenizer files go with the outputs: `tokenizer` (loaded from --tokenizer) saved into
    a temporary directory, or the model's own directory."""
    if tokenizer is None:
        return source
    import tempfile

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compress-tokenizer-")))
    tokenizer.save_pretrained(str(tmp))
    return tmp
