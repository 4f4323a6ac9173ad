from loraplex.resolvers.base import LoRAResolver, LoRAResolverRegistry

__all__ = ["LoRAResolver", "LoRAResolverRegistry"]
