"""Resolve one adapter in a fresh process and print the result as JSON.

    python resolve_once.py {s3|hf} LORA_NAME BASE_MODEL

The resolver is built from the environment exactly as the plugin builds it, so a
test controls it through env vars (cache dir, URI or repo list, endpoints).
"""

from __future__ import annotations

import asyncio
import json
import sys


def main() -> None:
    kind, lora_name, base_model = sys.argv[1:4]
    if kind == "s3":
        from loraplex.resolvers.remote import RemoteResolver
        resolver = RemoteResolver.from_env()
    else:
        from loraplex.resolvers.hf_hub import HfHubResolver
        resolver = HfHubResolver.from_env()
    print("started", flush=True)
    request = asyncio.run(resolver.resolve_lora(base_model, lora_name))
    print(json.dumps(None if request is None else {"name": request.lora_name, "path": request.lora_path}),
          flush=True)


if __name__ == "__main__":
    main()
