"""The plugin hooks loraplex calls. Every hook here has a heading in docs/plugins.md."""

from __future__ import annotations

import pluggy

PROJECT_NAME = "loraplex"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_lora_resolvers(register):
    """Register LoRA resolvers provided by this plugin.

    `register(name, resolver)` takes a resolver name (the name users see in
    `loraplex plugins` and logs) and a `loraplex.resolvers.LoRAResolver`
    instance. loraplex owns ordering and name clashes: resolvers are tried in
    the order of the plugins in VLLM_PLUGINS (or load order when it is unset),
    and a second registration of a name replaces the first with a warning.
    A plugin whose configuration is absent (e.g. no bucket URI set) should
    register nothing rather than raise; one whose configuration is present
    but wrong should raise loraplex.errors.ConfigError naming the setting:
    the loader logs it with the plugin's name, rolls back what the plugin
    registered, and `loraplex plugins` shows it. Called once per process (per
    reset_plugins()); it must not do network I/O, since resolvers connect on
    their first resolve_lora call.
    """
