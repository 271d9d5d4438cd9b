"""The Hugging Face hub as a user without network meets it: one place that says, within a second or two, whether
the hub may be asked at all (`glue:TASK` data, `--tokenizer NAME`). huggingface_hub and `datasets` retry a
failed request five times with backoff (about 25 s with no network) and have no setting to stop that."""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

HUB_PROBE_TIMEOUT_S = 1.5  # how long `glue:TASK` waits to learn that the hub cannot be reached


def hub_offline_flag() -> Optional[str]:
    """The environment variable that switches the Hugging Face hub off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE,
    TRANSFORMERS_OFFLINE set to 1 / true / yes / on), or None."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S, path: str = "/api/datasets/nyu-mll/glue") -> Optional[str]:
    """Why the Hugging Face hub ($HF_ENDPOINT, default https://huggingface.co; through the proxy the environment
    names) does not answer an HTTP HEAD of `path` within `timeout` seconds (DNS, connect, TLS and the answer
    together), or None when it answers (any status below 500).

    `datasets` / huggingface_hub retry a failed request five times with backoff (about 25 s with no network), so
    `glue:TASK` asks this first and fails in one line at once."""
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    host = urllib.parse.urlparse(endpoint).netloc or endpoint
    result = {}

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + path, method="HEAD"), timeout=timeout).close()
            result["ok"] = True
        except urllib.error.HTTPError as e:  # it answered
            if e.code < 500:
                result["ok"] = True
            else:
                result["error"] = f"it answered HTTP {e.code}"
        except Exception as e:  # URLError (DNS, refused, TLS), timeouts, a malformed HF_ENDPOINT
            reason = getattr(e, "reason", None) or e
            result["error"] = f"{type(reason).__name__}: {getattr(reason, 'strerror', None) or reason}"

    thread = threading.Thread(target=ask, daemon=True)  # DNS has no timeout of its own: bound everything here
    thread.start()
    thread.join(timeout + 0.1)
    if result.get("ok"):
        return None
    return f"{host}: " + result.get("error", f"no answer within {timeout:g} s")
