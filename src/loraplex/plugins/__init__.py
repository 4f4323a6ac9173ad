from loraplex.plugins.hookspecs import hookimpl
from loraplex.plugins.loader import PluginRecord, get_plugin_manager, load_plugins, reset_plugins, resolver_order

__all__ = ["hookimpl", "PluginRecord", "get_plugin_manager", "load_plugins", "reset_plugins", "resolver_order"]
