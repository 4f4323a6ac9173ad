"""A vLLM LoRA resolver plugin: adapters stored in S3, downloaded on their first request.

It is written for vLLM only, following the S3 example of vLLM's LoRA documentation: it
imports nothing but `vllm.*` and s3fs. loraplex loads it unchanged (docs/vllm.md).

    S3_PATH_TEMPLATE     where an adapter lives, e.g. s3://my-bucket/loras/{lora_name}
    LOCAL_PATH_TEMPLATE  where it is downloaded to, e.g. /srv/lora-cache/{lora_name}

Both templates may use {base_model_name} and {lora_name}.
"""

import os

import s3fs
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

logger = init_logger(__name__)


class S3LoRAResolver(LoRAResolver):
    def __init__(self, s3_path_template: str, local_path_template: str):
        self.s3 = s3fs.S3FileSystem()
        self.s3_path_template = s3_path_template
        self.local_path_template = local_path_template

    async def resolve_lora(self, base_model_name, lora_name):
        names = {"base_model_name": base_model_name, "lora_name": lora_name}
        s3_path = self.s3_path_template.format(**names)
        local_path = self.local_path_template.format(**names)
        if not await self.s3._exists(s3_path):
            return None   # not in this bucket: the next resolver may have it
        # The adapter's files (adapter_config.json, weights) sit directly under its prefix.
        await self.s3._get(s3_path, local_path, recursive=True, maxdepth=1)
        logger.info("downloaded LoRA adapter %s from %s to %s", lora_name, s3_path, local_path)
        return LoRARequest(lora_name=lora_name, lora_path=local_path, lora_int_id=abs(hash(lora_name)))


def register():
    """The entry point: vLLM (or loraplex) calls it once when the plugin loads."""
    s3_path_template = os.getenv("S3_PATH_TEMPLATE")
    local_path_template = os.getenv("LOCAL_PATH_TEMPLATE")
    if not s3_path_template or not local_path_template:
        logger.warning("S3_PATH_TEMPLATE and LOCAL_PATH_TEMPLATE must both be set; the S3 LoRA "
                       "resolver is not registered")
        return
    LoRAResolverRegistry.register_resolver("s3_resolver", S3LoRAResolver(s3_path_template, local_path_template))
