"""MultimodalProcessor: a prompt's `multi_modal_data` checked, preprocessed and tied to its placeholders.

    token ids with one <image> (or <|audio|>) per item  +  {"image": PIL | [PIL, ...]}
        -> token ids with each placeholder repeated once per embedding  +  MultimodalInputs

A prompt may also carry the placeholders already expanded (as many as the items' embeddings,
each item's run contiguous). Every mismatch is an InvalidRequestError that names the counts:
placeholders vs items, a modality the model does not take, more items than
limit_mm_per_prompt, an item that does not decode or is too long for max_model_len.
"""

from __future__ import annotations

from pathlib import Path

from loraplex.core.model_config import ModelConfig
from loraplex.core.models import family
from loraplex.core.multimodal.inputs import MODALITIES, MultimodalInputs, MultimodalItem
from loraplex.errors import ConfigError, InvalidRequestError


class MultimodalProcessor:
    def __init__(self, model_config: ModelConfig, model_dir: str | Path, *, max_model_len: int,
                 limits: dict[str, int] | None = None, placeholder_text: str | None = None):
        module = family(model_config)
        self.architecture = model_config.architecture
        self.modality: str = module.MODALITY
        self.placeholder_id: int = module.placeholder_token_id(model_config)
        if not 0 <= self.placeholder_id < model_config.vocab_size:
            raise ConfigError(f"the {self.modality} placeholder token id {self.placeholder_id} is outside the "
                              f"language model's vocabulary of {model_config.vocab_size}.")
        # How the placeholder is written in a prompt (e.g. "<image>"), for messages and chat rendering.
        self.placeholder_text = placeholder_text or f"<{self.modality}>"
        self.items = module.item_processor(model_config, model_dir)
        self.max_model_len = max_model_len
        self.limit = (limits or {}).get(self.modality)

    def process(self, token_ids: list[int], data) -> tuple[list[int], MultimodalInputs | None]:
        """(expanded token ids, items); (token_ids, None) for a prompt without multimodal data."""
        raw_items = self._raw_items(data)
        placeholders = [i for i, t in enumerate(token_ids) if t == self.placeholder_id]
        if not raw_items:
            if placeholders:
                raise InvalidRequestError(
                    f"the prompt holds {len(placeholders)} {self.placeholder_text} placeholder token(s) but no "
                    f"{self.modality} was given; pass multi_modal_data={{'{self.modality}': ...}} or remove them")
            return token_ids, None
        if len(placeholders) < len(raw_items):   # before any preprocessing work
            self._mismatch(len(placeholders), len(raw_items))
        # Tokens one item may take: the prompt's other tokens and one generated token must fit too.
        budget = self.max_model_len - 1 - (len(token_ids) - len(placeholders))
        items = []
        for index, raw in enumerate(raw_items):
            data_tensor, length = self.items(raw, self._where(index, len(raw_items)), max_tokens=budget)
            items.append(MultimodalItem(self.modality, data_tensor, -1, length))
        return self._place(token_ids, placeholders, items), MultimodalInputs(items)

    def num_prompt_tokens(self, token_ids: list[int], data) -> int:
        """The prompt's length once its placeholders are expanded (cheap: no preprocessing); the
        unexpanded length when they do not match the items (process() then says why)."""
        raw_items = self._raw_items(data)
        placeholders = sum(t == self.placeholder_id for t in token_ids)
        if not raw_items or placeholders != len(raw_items):
            return len(token_ids)
        budget = self.max_model_len - 1 - (len(token_ids) - placeholders)
        return len(token_ids) - placeholders + sum(
            self.items.num_tokens(item, self._where(index, len(raw_items)), max_tokens=budget)
            for index, item in enumerate(raw_items))

    def _where(self, index: int, count: int) -> str:
        return f"{self.modality} {index}" if count > 1 else f"the {self.modality}"

    def _raw_items(self, data) -> list:
        if data is None:
            return []
        if not isinstance(data, dict):
            raise InvalidRequestError(f"multi_modal_data must be a dict like {{'{self.modality}': ...}}, "
                                      f"got {type(data).__name__}")
        for key in data:
            if key not in MODALITIES:
                raise InvalidRequestError(f"multi_modal_data has an unknown modality {key!r}; "
                                          f"known: {', '.join(MODALITIES)}")
            if key != self.modality and data[key] is not None:
                raise InvalidRequestError(f"this model ({self.architecture}) takes {self.modality} input only, "
                                          f"not {key}; remove multi_modal_data[{key!r}]")
        value = data.get(self.modality)
        raw = [] if value is None else list(value) if isinstance(value, list) else [value]
        if self.limit is not None and len(raw) > self.limit:
            raise InvalidRequestError(
                f"the prompt has {len(raw)} {self.modality} item(s) but at most {self.limit} are allowed per prompt "
                f"(limit_mm_per_prompt / --limit-mm-per-prompt); send fewer or raise the limit")
        return raw

    def _place(self, token_ids: list[int], placeholders: list[int], items: list[MultimodalItem]) -> list[int]:
        total = sum(item.length for item in items)
        if len(placeholders) == len(items):
            # One placeholder per item: repeat each to its item's length.
            expanded, start = [], 0
            for position, item in zip(placeholders, items):
                expanded.extend(token_ids[start:position])
                item.offset = len(expanded)
                expanded.extend([self.placeholder_id] * item.length)
                start = position + 1
            return expanded + token_ids[start:]
        if len(placeholders) == total:
            # Already expanded: each item's placeholders must be one contiguous run.
            cursor = 0
            for index, item in enumerate(items):
                run = placeholders[cursor:cursor + item.length]
                if run[-1] - run[0] != item.length - 1:
                    raise InvalidRequestError(
                        f"the prompt's {self.placeholder_text} tokens for {self.modality} {index} are not "
                        f"contiguous; put one {self.placeholder_text} per {self.modality}")
                item.offset = run[0]
                cursor += item.length
            return token_ids
        self._mismatch(len(placeholders), len(items), total)

    def _mismatch(self, num_placeholders: int, num_items: int, total: int | None = None):
        expanded = f" (or {total} when already expanded)" if total is not None else ""
        raise InvalidRequestError(
            f"the prompt holds {num_placeholders} {self.placeholder_text} placeholder token(s) but "
            f"multi_modal_data has {num_items} {self.modality} item(s); the prompt needs one "
            f"{self.placeholder_text} per {self.modality}{expanded}")
