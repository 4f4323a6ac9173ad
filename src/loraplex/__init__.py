from loraplex.lora_request import LoRARequest

__all__ = ["LoRARequest"]
