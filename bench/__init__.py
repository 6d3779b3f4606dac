"""`make bench`: the runner's overhead against the bare vLLM engine and vLLM's own server."""
