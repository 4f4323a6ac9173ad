from loraplex.resolvers.base import LoRAResolver, LoRAResolverRegistry
from loraplex.resolvers.chain import ResolverChain

__all__ = ["LoRAResolver", "LoRAResolverRegistry", "ResolverChain"]
