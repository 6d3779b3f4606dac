"""``python -m runner.healthcheck``: the container's HEALTHCHECK.

Healthy while the runner answers /health with anything but ERROR (LOADING
included: the image's start period covers loading). Exit 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = json.load(response).get("status")
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status not in ("LOADING", "IDLE", "OK"):
        print(f"unhealthy: {url} says {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
