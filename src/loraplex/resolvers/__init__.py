from loraplex.resolvers.base import LoRAResolver, LoRAResolverRegistry, report_skipped
from loraplex.resolvers.chain import ResolverChain

__all__ = ["LoRAResolver", "LoRAResolverRegistry", "ResolverChain", "report_skipped"]
