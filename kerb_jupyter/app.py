"""The jupyter-server extension: configuration traits, REST handlers, and the keeper's lifetime."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, TraitError, Unicode, default, validate

from . import __version__, metrics
from .config import ENV_CONFIG, Settings, load_settings
from .errors import ConfigError, KerbJupyterError
from .handlers import RateLimiter
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
    renew_min_interval = Float(
        10.0, config=True, help="POST api/renew is allowed once per this many seconds (rate limit). Default 10."
    )
    check_min_interval = Float(
        2.0, config=True,
        help="POST api/clusters/<name>/check is allowed once per this many seconds per cluster. Default 2.",
    )

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
        self.keeper: TicketKeeper | None = None
        self.config_error: KerbJupyterError | None = None
        self.renew_limiter = RateLimiter(self.renew_min_interval)
        self.check_limiter = RateLimiter(self.check_min_interval)
        self.settings.update(kerb_jupyter_app=self)
        try:
            self.settings_obj: Settings = load_settings(self.config_file or None)
            self.keeper = self._make_keeper(self.settings_obj)
        except KerbJupyterError as err:
            # Keep serving: the status page and API say what is wrong instead of a missing page.
            self.config_error = err
            self.settings_obj = Settings(path=None)
            self.log.error("kerb_jupyter: configuration error: %s", err)
        if self.keeper is not None:
            # Kernels copy the server's environment when they start: this is how they find the cache.
            # Only when we keep a ticket: installing the package must not take over anyone's KRB5CCNAME.
            os.environ["KRB5CCNAME"] = f"FILE:{self.settings_obj.cache_path}"
            os.environ["KERB_JUPYTER_STATE_DIR"] = str(self.settings_obj.state_dir)
        if self.settings_obj.path is not None:
            os.environ[ENV_CONFIG] = str(self.settings_obj.path)
        if self.keeper is None:
            who = "no principal configured"
        elif self.keeper.principal:
            who = f"principal {self.keeper.principal} (configured)"
        else:
            order = self.settings_obj.identity.get("order") or ["default order"]
            who = f"principal from identity ({', '.join(order)}) and mapping rules"
        self.log.info(
            "kerb_jupyter %s: %s, ticket from %s, cache %s, clusters: %s", __version__, who,
            self.keeper.source.describe() if self.keeper else "(nothing)", self.settings_obj.cache_path,
            ", ".join(self.settings_obj.clusters) or "(none)",
        )

    def _make_keeper(self, settings: Settings) -> TicketKeeper | None:
        principal = self.principal or settings.principal
        resolve = None
        if not principal and (settings.identity or settings.mapping):
            resolve = make_resolver(settings)
        broker = settings.source.get("type") == "broker"  # the broker itself says who the user is
        if not (principal or resolve or broker) or not settings.source:
            return None
        try:
            source = build_source(settings.source)
        except ConfigError as err:
            raise ConfigError(f"{settings.path or 'the configuration'}: {err}") from None
        if broker and not principal and resolve is None:
            resolve = source.resolver(settings.cache_path)  # type: ignore[attr-defined]
        return TicketKeeper(
            principal or None,
            source,
            settings.cache_path,
            settings.state_path,
            renew_fraction=self.renew_fraction,
            retry_interval=self.retry_interval,
            max_retry_interval=self.max_retry_interval,
            lifetime=self.ticket_lifetime or None,
            renew_life=self.renewable_lifetime,
            identity={"name": principal, "source": "config", "trusted": False} if principal else None,
            resolve=resolve,
        )

    def initialize_handlers(self) -> None:
        from .handlers import handlers

        self.handlers.extend(handlers(self.extension_url))

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.keeper is not None and self.start_keeper:
            self.keeper.start()
            self._collector = metrics.register(self.keeper)

    async def stop_extension(self) -> None:
        keeper = getattr(self, "keeper", None)  # absent when initialisation failed
        if keeper is not None:
            await keeper.stop()
        metrics.unregister(getattr(self, "_collector", None))
        self._collector = None

def make_resolver(settings: Settings) -> Callable[[], tuple[dict[str, Any], str]]:
    """Identity chain + mapping rules as one call the keeper makes (in a thread: AWS calls block)."""
    from .identity import IdentityResolver
    from .mapping import map_identity

    resolver = IdentityResolver(settings.identity)

    def resolve() -> tuple[dict[str, Any], str]:
        identity = resolver.resolve()
        return identity.as_dict(), map_identity(identity.name, settings.mapping)

    return resolve
