from loraplex.core.outputs import CompletionOutput, RequestOutput
from loraplex.core.sampling_params import RequestOutputKind, SamplingParams
from loraplex.core.structured_output import StructuredOutputsParams
from loraplex.lora_request import LoRARequest

__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "StructuredOutputsParams", "LoRARequest", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in torch and the model; importing loraplex.resolvers alone should not.
    if name == "LLM":
        from loraplex.llm import LLM
        return LLM
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
