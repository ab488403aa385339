"""The jupyter-server extension: configuration traits, REST handlers, and the keeper's lifetime."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, TraitError, Unicode, default, validate

from . import __version__
from .config import ENV_CONFIG, Settings, load_settings
from .keeper import TicketKeeper
from .sources import build_source


class KerbJupyterApp(ExtensionApp):
    """Keeps a Kerberos ticket for the notebook user renewed in a cache that every kernel shares."""

    name = "kerb_jupyter"
    description = __doc__
    extension_url = "/kerb-jupyter/"
    load_other_extensions = True

    config_file = Unicode(
        "",
        config=True,
        help="Path of the shared kerb_jupyter JSON configuration (clusters, principal, credential source). "
        f"Default: the environment variable {ENV_CONFIG}, else ~/.jupyter/kerb_jupyter.json.",
    )
    principal = Unicode(
        "",
        config=True,
        help="Kerberos principal (user@REALM) to keep a ticket for; overrides the configuration file. "
        "Default: empty, meaning the file's 'principal' (or the identity mapping).",
    )
    renew_fraction = Float(
        0.8,
        config=True,
        help="Renew when this fraction of the ticket lifetime has passed (0.1-0.95; 5% jitter is added). "
        "Default 0.8.",
    )
    retry_interval = Float(
        60.0,
        config=True,
        help="Seconds before the first retry after a failed renewal; doubles per failure up to "
        "max_retry_interval. Default 60.",
    )
    max_retry_interval = Float(900.0, config=True, help="Longest wait between retries, seconds. Default 900.")
    ticket_lifetime = Int(
        0, config=True, help="Requested ticket lifetime in seconds; 0 asks for the KDC's maximum. Default 0."
    )
    renewable_lifetime = Int(
        7 * 86400,
        config=True,
        help="Requested renewable lifetime in seconds (the KDC may grant less). Default 604800 (7 days).",
    )
    start_keeper = Bool(True, config=True, help="Start the ticket keeper with the server. Default True.")

    @default("config_file")
    def _default_config_file(self) -> str:
        return os.environ.get(ENV_CONFIG, "")

    @validate("renew_fraction")
    def _check_fraction(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0.1 <= value <= 0.95:
            raise TraitError(f"KerbJupyterApp.renew_fraction must be between 0.1 and 0.95, not {value}")
        return value

    @validate("retry_interval", "max_retry_interval")
    def _check_interval(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value < 0.1:
            raise TraitError(f"KerbJupyterApp.{proposal['trait'].name} must be at least 0.1 s, not {value}")
        return value

    # -- set-up -----------------------------------------------------------------------------------------
    def initialize_settings(self) -> None:
        self.settings_obj: Settings = load_settings(self.config_file or None)
        self.keeper: TicketKeeper | None = None
        principal = self.principal or self.settings_obj.principal
        cache = self.settings_obj.cache_path
        # Kernels copy the server's environment when they start: this is how they find the cache.
        os.environ["KRB5CCNAME"] = f"FILE:{cache}"
        os.environ["KERB_JUPYTER_STATE_DIR"] = str(self.settings_obj.state_dir)
        if self.settings_obj.path is not None:
            os.environ[ENV_CONFIG] = str(self.settings_obj.path)
        resolve = None
        if not principal and (self.settings_obj.identity or self.settings_obj.mapping):
            resolve = make_resolver(self.settings_obj)
        if (principal or resolve) and self.settings_obj.source:
            self.keeper = TicketKeeper(
                principal or None,
                build_source(self.settings_obj.source),
                cache,
                self.settings_obj.state_path,
                renew_fraction=self.renew_fraction,
                retry_interval=self.retry_interval,
                max_retry_interval=self.max_retry_interval,
                lifetime=self.ticket_lifetime or None,
                renew_life=self.renewable_lifetime,
                identity={"name": principal, "source": "config", "trusted": False} if principal else None,
                resolve=resolve,
            )
        self.settings.update(kerb_jupyter_app=self)
        self.log.info(
            "kerb_jupyter %s: principal %s, source %s, cache %s, clusters %s",
            __version__,
            principal or ("(from identity: " + ", ".join(self.settings_obj.identity.get("order", ["default order"]))
                          + ")" if resolve else "(none configured)"),
            self.keeper.source.describe() if self.keeper else "(none)",
            cache,
            ", ".join(self.settings_obj.clusters) or "(none)",
        )

    def initialize_handlers(self) -> None:
        from .handlers import handlers

        self.handlers.extend(handlers(self.extension_url))

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.keeper is not None and self.start_keeper:
            self.keeper.start()

    async def stop_extension(self) -> None:
        if self.keeper is not None:
            await self.keeper.stop()

    @property
    def state_dir(self) -> Path:
        return self.settings_obj.state_dir


def make_resolver(settings: Settings) -> Callable[[], tuple[dict[str, Any], str]]:
    """Identity chain + mapping rules as one call the keeper makes (in a thread: AWS calls block)."""
    from .identity import IdentityResolver
    from .mapping import map_identity

    resolver = IdentityResolver(settings.identity)

    def resolve() -> tuple[dict[str, Any], str]:
        identity = resolver.resolve()
        return identity.as_dict(), map_identity(identity.name, settings.mapping)

    return resolve
