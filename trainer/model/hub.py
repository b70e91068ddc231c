"""The Hugging Face Hub, asked once whether it can be reached.

Without `HF_HUB_OFFLINE=1`, huggingface_hub retries every request of an unreachable hub
five times with backoff (about 30 s here for one config.json), and does so again for the
tokenizer and the weights, before it falls back to the files in its cache or fails. On an
air-gapped node that is minutes of retry messages before one line. So before the first hub
id is loaded, one TCP connection to the endpoint (3 s at most) decides: unreachable, the
process works offline from the cache, as if HF_HUB_OFFLINE=1 had been set, and a hub id
that is not in the cache is one line at once.
Behind a proxy the probe would say nothing true, so it is skipped there.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlsplit

from huggingface_hub import constants

PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


@functools.cache
def unreachable() -> str | None:
    """Why the hub can't be reached (then this process works offline: huggingface_hub,
    transformers and datasets are switched to their offline mode, which each reads from one
    module constant), or None: reachable, asked to be offline, or behind a proxy."""
    if constants.is_offline_mode() or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        _go_offline()
        return f"the hub ({endpoint.hostname}) is unreachable: {err.strerror or err}"
    return None


def _go_offline() -> None:
    """What HF_HUB_OFFLINE=1 at process start would have set (and for the processes this
    one starts)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # read at its import; set for a later one by the variable
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
