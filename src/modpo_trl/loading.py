"""Loading models and tokenizers by path or hub id, with errors that name what could not be loaded.

A folder with an `adapter_config.json` is a LoRA adapter and is loaded onto the base model it names.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def load_tokenizer(path: str | os.PathLike, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Loads a tokenizer (of a hub id at `revision`), giving a clear error (with the path) when it cannot."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision)
    except Exception as e:
        raise OSError(f"could not load a tokenizer from {str(path)!r}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(auto_class, path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Loads a model, or a LoRA adapter folder on its base model, with a clear error when it cannot."""
    path = str(path)
    try:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            peft_class = {
                AutoModelForCausalLM: AutoPeftModelForCausalLM,
                AutoModelForSequenceClassification: AutoPeftModelForSequenceClassification,
            }[auto_class]
            model = peft_class.from_pretrained(path, **kwargs)
        else:
            model = auto_class.from_pretrained(path, **kwargs)
    except Exception as e:
        raise OSError(f"could not load a model from {path!r} with {auto_class.__name__}: {e}") from e
    if "device_map" not in kwargs and "quantization_config" not in kwargs:
        model.to(PartialState().device)
    model.requires_grad_(False)
    return model


TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(
    path: str | os.PathLike, split: str = "train", name: str | None = None, data_dir: str | None = None
) -> Dataset:
    """A split of a hub data set, a local json/jsonl/csv/parquet file, or a `save_to_disk` folder.

    Raises ValueError for an unsupported file type and OSError (naming `path`) when loading fails.
    """
    local = Path(path).expanduser()
    if local.is_file() and local.suffix not in TABLE_BUILDERS:
        raise ValueError(f"data path {str(path)!r}: unsupported file type; valid: {sorted(TABLE_BUILDERS)}")
    if local.is_file() and local.suffix != ".parquet":
        _check_text_file(local, str(path))
    try:
        if local.is_dir() and (
            (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()
        ):
            loaded = load_from_disk(str(local))
            return loaded[split] if isinstance(loaded, DatasetDict) else loaded
        if local.is_file():
            # A local file holds one split; `split` names which part of a hub data set to use.
            return load_dataset(TABLE_BUILDERS[local.suffix], data_files=str(local), split="train")
        return load_dataset(str(path), name, data_dir=data_dir, split=split)
    except Exception as e:
        problem = _text_file_problem(local) if local.is_file() and local.suffix != ".parquet" else None
        if problem:  # the parsers' own messages name neither the file nor the line
            raise ValueError(f"data path {str(path)!r}, {problem}") from e
        raise OSError(f"could not load data set {str(path)!r} (split {split!r}): {e}") from e


def _check_text_file(path: Path, shown: str) -> None:
    """A json/jsonl/csv file must hold something, in UTF-8: the parsers accept other bytes and fail only when a
    row is read, far from here. One pass over the file (an incremental decoder, about 1 GB/s)."""
    decoder, blank = codecs.getincrementaldecoder("utf-8")(), True
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                decoder.decode(block)
                blank = blank and not block.strip()
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"data path {shown!r}, {_text_file_problem(path) or 'is not UTF-8 text'}") from None
    if blank:
        raise ValueError(f"data path {shown!r} holds no rows (the file is empty)")


def _text_file_problem(path: Path) -> str | None:
    """The first line that makes a json/jsonl/csv file unreadable as a table: not UTF-8 or (JSON Lines) not one
    JSON object; None when there is none."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); save it as UTF-8"
            if line.strip() and path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {number}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
                if not isinstance(row, dict):
                    return f"line {number}: a JSON {type(row).__name__}, not an object; each line must be one JSON object"
    return None
