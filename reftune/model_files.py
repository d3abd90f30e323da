"""Checking a model before loading it: one message naming the missing or broken file, instead of
what transformers says ("You need sentencepiece or tiktoken", "no EOS token", a 50 s wait on the
Hub for a mistyped folder, a traceback from a truncated `model.safetensors`).

A local folder is checked for config.json, a complete weights file and the tokenizer files; a name
that looks like a path and does not exist never reaches the Hub; a Hub id that is not in the local
cache is only tried when the Hub answers within a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import zipfile
from pathlib import Path

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names the path or id."""


def _error(message: str) -> Exception:
    return ModelLoadError(message)


def looks_local(name: str) -> bool:
    """A path, not a Hub id: starts with . / ~, has a backslash or two slashes, ends with a slash,
    or its first part is a folder that exists here (`runs/nope` when `runs/` exists)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/"):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def check_safetensors(path: Path) -> None:
    """The header is readable and the file holds every byte it announces (a truncated copy fails)."""
    size = path.stat().st_size
    broken = f"{path} is truncated or damaged"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _error(f"{broken} ({size} bytes, not even a header): copy or save it again")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 100 * 2**20:
            raise _error(f"{broken} ({size} bytes; its header alone says {n + 8}): copy or save it again")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise _error(f"{broken} (its header is not valid JSON): copy or save it again") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise _error(f"{broken}: it holds {size} bytes, its tensors need {need}: copy or save it again")


def _check_weights(folder: Path) -> None:
    present = [w for w in WEIGHTS if (folder / w).exists()]
    if not present:
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise _error(f"no weights file in {folder} (expected model.safetensors or pytorch_model.bin; "
                     f"found: {', '.join(found) or 'nothing'})")
    name = present[0]
    path = folder / name
    if not os.access(path, os.R_OK):
        raise _error(f"{path} is not readable (permissions)")
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise _error(f"{path} is damaged (not a weights index with a weight_map)") from None
        for shard in shards:
            if not (folder / shard).exists():
                raise _error(f"{folder / shard} is missing (listed in {name})")
            if shard.endswith(".safetensors"):
                check_safetensors(folder / shard)
    elif name.endswith(".safetensors"):
        check_safetensors(path)
    elif not zipfile.is_zipfile(path) and path.stat().st_size < 1024:
        raise _error(f"{path} is truncated or damaged (not a torch archive): copy or save it again")


def check_model_folder(folder: Path, tokenizer: bool = True, weights: bool = True) -> None:
    """config.json (valid JSON), a complete weights file, and the tokenizer's files."""
    config = folder / "config.json"
    if not config.exists():
        hint = ""
        if (folder / "checkpoints").is_dir():
            hint = " (a run folder? point at one of its checkpoints, e.g. checkpoints/best/policy or checkpoints/epoch-N)"
        elif (folder / "policy" / "config.json").exists():
            hint = f" (a checkpoint folder: the model is {folder / 'policy'})"
        raise _error(f"{config} is missing: {folder} is not a Hugging Face model folder{hint}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise _error(f"{config} is damaged or unreadable ({type(e).__name__}): copy or save the model again") from None
    if weights:
        _check_weights(folder)
    if tokenizer:
        if not (folder / "tokenizer_config.json").exists():
            raise _error(f"{folder / 'tokenizer_config.json'} is missing: it holds the tokenizer's settings "
                         f"(EOS and pad tokens); save the tokenizer with save_pretrained into {folder}")
        if not any((folder / v).exists() for v in VOCABULARIES):
            raise _error(f"no tokenizer vocabulary in {folder} (expected tokenizer.json, or tokenizer.model / "
                         f"vocab.json + merges.txt); save the tokenizer with save_pretrained into it")
        try:
            json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            if (folder / "tokenizer.json").exists():
                json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise _error(f"a tokenizer file in {folder} is damaged ({type(e).__name__}: {e}); save it again") from None


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy a direct probe says nothing: let the Hub client try
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^\w+://", "", endpoint).split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_source(name_or_path: str, key: str = "model", tokenizer: bool = True, weights: bool = True) -> None:
    """Refuse, with one message, a model that cannot load: see the module doc."""
    if isinstance(name_or_path, os.PathLike):  # a pathlib.Path from Python callers
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise _error(f"no model given: set `{key}` to a Hugging Face id or a local folder")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise _error(f"{key}={name_or_path!r} is a file; expected a model folder (config.json, weights, tokenizer)")
        check_model_folder(path, tokenizer=tokenizer, weights=weights)
        return
    if looks_local(name_or_path) or not _HUB_ID.match(name_or_path):
        raise _error(f"model path not found: {name_or_path} ({key}; resolved: {path.resolve()})")
    if _in_hf_cache(name_or_path):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise _error(f"{key}={name_or_path!r}: not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE "
                     f"is set, so the Hub is not asked); check the path")
    if not _hub_reachable():
        raise _error(f"{key}={name_or_path!r}: not a local folder (./{name_or_path} does not exist), not in the "
                     f"Hugging Face cache, and the Hub is unreachable from here; check the path, or the network")
