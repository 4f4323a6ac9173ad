"""LLM: the offline API. Load a checkpoint once, then generate for batches of prompts.

Multimodal checkpoints take {"prompt": ..., "multi_modal_data": {...}} prompts and chat
messages with image/audio content parts; `default_mm_loras` adapters apply to prompts of
their modality (core/multimodal/default_loras.py has the rule).
"""

from __future__ import annotations

import dataclasses
import itertools

from tqdm.auto import tqdm

from loraplex.core.config import EngineConfig
from loraplex.core.generation_defaults import generation_defaults
from loraplex.core.llm_engine import LLMEngine
from loraplex.core.multimodal.chat import content_format, parse_chat_messages
from loraplex.core.multimodal.default_loras import DefaultLoRAs, resolve_default_adapter
from loraplex.core.multimodal.media import MediaLoader
from loraplex.core.outputs import RequestOutput
from loraplex.core.sampling_params import RequestOutputKind, SamplingParams
from loraplex.core.tokenizer import Tokenizer
from loraplex.errors import ConfigError, InvalidRequestError
from loraplex.lora_request import LoRARequest, lora_id_for_name

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


def _is_token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _per_prompt(value, num_prompts: int, name: str) -> list:
    """Broadcast a single value to every prompt, or check a list has one per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_prompts:
            raise InvalidRequestError(
                f"{name} is a list of {len(value)} but there are {num_prompts} prompts; "
                f"pass one {name} or one per prompt")
        return list(value)
    return [value] * num_prompts


class LLM:
    """Generate text for batches of prompts (vLLM-compatible).

    Extra keyword arguments are EngineConfig fields (block_size, kv_cache_bytes,
    max_num_batched_tokens, enforce_eager, ...). With tensor_parallel_size > 1 the engine
    starts one process per further rank (`spawn`): a script that creates an LLM at import
    time needs the `if __name__ == "__main__":` guard, as with vLLM.
    """

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None, seed: int = 0,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, tensor_parallel_size: int = 1, enable_lora: bool = False,
                 max_loras: int = 1, max_lora_rank: int = 16, max_cpu_loras: int | None = None, **kwargs) -> None:
        unknown = sorted(set(kwargs) - _CONFIG_FIELDS)
        if unknown:
            raise ConfigError(f"unknown LLM argument(s) {', '.join(unknown)}; valid extra arguments "
                              f"are EngineConfig fields: {', '.join(sorted(_CONFIG_FIELDS - {'model'}))}")
        config = EngineConfig(model=model, dtype=dtype, device=device, seed=seed, max_model_len=max_model_len,
                              gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                              tensor_parallel_size=tensor_parallel_size, enable_lora=enable_lora, max_loras=max_loras, max_lora_rank=max_lora_rank,
                              max_cpu_loras=max_cpu_loras, **kwargs)
        self.llm_engine = LLMEngine(config)
        self._sampling_defaults = generation_defaults(config.model, config.generation_config,
                                                      config.override_generation_config)
        self._request_ids = itertools.count()
        self._media = MediaLoader.from_config(config)
        self._default_loras = DefaultLoRAs()
        self._default_mm_loras = self._load_default_mm_loras()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use when given no SamplingParams: the sampling parameters
        the model's generation_config.json recommends (generation_config="vllm": none), with
        override_generation_config on top."""
        return SamplingParams(**self._sampling_defaults)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of `prompts`.

        prompts: a string, a list of token ids, a {"prompt": ...} / {"prompt_token_ids": [...]}
        dict, or a list of those. sampling_params and lora_request: one for all prompts,
        or a list with one per prompt; no sampling_params: get_default_sampling_params().
        """
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidRequestError("prompts must be a prompt or a non-empty list of prompts")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _per_prompt(sampling_params, len(prompts), "sampling_params")
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        return self._run(list(zip(prompts, params, loras)), use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             lora_request: LoRARequest | list[LoRARequest] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of them.

        With a multimodal model, content may be a list of parts: text, image_url / image_pil,
        input_audio / audio_url (docs/multimodal.md)."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise InvalidRequestError("chat() needs the checkpoint's tokenizer (tokenizer.json)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            conversation, mm_data = self._parse_media(conversation, chat_template or tokenizer.chat_template)
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template)
            prompt = {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
            prompts.append(dict(prompt, multi_modal_data=mm_data) if mm_data else prompt)
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)

    def _parse_media(self, conversation, template: str | None):
        """Media content parts out of a conversation (for the chat template and multi_modal_data)."""
        processor = self.llm_engine.mm_processor
        has_media = isinstance(conversation, list) and any(
            isinstance(m, dict) and isinstance(m.get("content"), list) and
            any(isinstance(p, dict) and p.get("type") != "text" for p in m["content"]) for m in conversation)
        if processor is None and not has_media:
            return conversation, {}
        placeholders = {processor.modality: processor.placeholder_text} if processor is not None else {}
        return parse_chat_messages(conversation, fmt=content_format(template), placeholders=placeholders,
                                   media=self._media)

    # ---- LoRA adapters ----------------------------------------------------------------------

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and validate an adapter into the CPU cache; False if it was already loaded."""
        return self.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Free the adapter's device slot and CPU copy; False if it was not loaded."""
        return self.llm_engine.remove_lora(lora_int_id)

    def pin_lora(self, lora_int_id: int) -> bool:
        """Keep a loaded adapter in the CPU cache and a device slot until it is removed."""
        return self.llm_engine.pin_lora(lora_int_id)

    def list_loras(self) -> set[int]:
        """Ids of the loaded adapters."""
        return self.llm_engine.list_loras()

    def _load_default_mm_loras(self) -> dict[str, LoRARequest]:
        """default_mm_loras as LoRARequests named after their modality, loaded (validated) now."""
        config, engine = self.llm_engine.config, self.llm_engine
        loras = {}
        for modality, path in (config.default_mm_loras or {}).items():
            processor = engine.mm_processor
            if processor is None or processor.modality != modality:
                takes = f"{processor.modality} input" if processor is not None else "text only"
                raise ConfigError(f"default_mm_loras has a {modality!r} adapter, but this model takes {takes}")
            loras[modality] = LoRARequest(modality, lora_id_for_name(modality),
                                          resolve_default_adapter(config.model, modality, path))
            engine.add_lora(loras[modality])
        return loras

    def _run(self, items: list, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        # Validate everything first, so a bad prompt leaves nothing half-queued.
        requests = [engine.process_request(f"llm-{next(self._request_ids)}", prompt, params, lora)
                    for prompt, params, lora in items]
        for request in requests:   # an explicit adapter wins; else a default one may apply
            if self._default_mm_loras and request.lora_request is None and request.mm_inputs is not None:
                request.lora_request = self._default_loras.pick(request.mm_inputs.modalities,
                                                                self._default_mm_loras)
        # Load (and validate) each adapter up front: an unusable one raises here, not mid-batch.
        for lora in {r.lora_request.lora_int_id: r.lora_request for r in requests if r.lora_request}.values():
            if lora.load_inplace or not engine.lora_manager.is_loaded(lora):
                engine.add_lora(lora)
            engine.lora_manager.check_servable(lora.lora_int_id)
        order = {r.request_id: i for i, r in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm)
        try:
            for request in requests:
                engine.add_processed_request(request, RequestOutputKind.FINAL_ONLY)
            while any(r is None for r in results):
                for output in engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        progress.update(1)
                failed = engine.pop_failed_requests()
                if failed:
                    raise failed[0][1]
        finally:
            progress.close()
            engine.abort_request([r.request_id for r in requests if results[order[r.request_id]] is None])
        return results
