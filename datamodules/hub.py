"""Pretrained transformers names resolved before loading, so that a name that cannot resolve fails at once.

transformers' from_pretrained on a hub name that is not cached, on a machine that cannot reach the hub, retries
with back-off for about 32 s before it fails (issue 19). `resolve_pretrained` answers in milliseconds: a local
folder or a cached snapshot is returned as a path (loaded without the network); otherwise the hub is probed once
(a 3 s TCP connect) and, when it cannot be reached, the error says so at once. Used for every pretrained model and
tokenizer the zoo loads (CCCL's BERT, VSE-infinity's BERT, the data's sub-word tokenizer).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def reachable(url: str, timeout: float = 3.0) -> bool:
    """One TCP connect to url's host and port (443 for https, else 80, unless the url names one)."""
    host = url.split("://")[-1].split("/")[0]
    port = 443 if url.startswith("https") else 80
    if ":" in host:
        host, port = host.split(":")[0], int(host.split(":")[1])
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    return reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def resolve_pretrained(name: str) -> str:
    """A local folder (as given), the cached snapshot folder of a hub name, or the hub name itself when the hub is
    reachable (from_pretrained then downloads it). Raises ValueError, naming the name, when none of these holds."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)  # cached: no network at all
    except Exception:  # noqa: BLE001 - not cached (or not a valid repo id): decided below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") \
        not in ("", "0")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached from this machine"
        raise ValueError(f"{name!r} is not a local folder nor in the hub cache, and {why}: give a local folder "
                         "holding the transformers files (config.json, weights, tokenizer.json), e.g. one written by "
                         "save_pretrained on a machine with access")
    return name
