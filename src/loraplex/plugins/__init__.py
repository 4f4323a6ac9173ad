from loraplex.plugins.hookspecs import hookimpl

__all__ = ["hookimpl"]
