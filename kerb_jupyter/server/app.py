"""The jupyter-server extension: configuration traits, REST handlers, and the keeper's lifetime."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, TraitError, Unicode, default, validate
from traitlets.config import Config
from traitlets.config.application import Application
from traitlets.config.loader import ConfigFileNotFound

from .. import __version__
from ..core import checks
from ..core.config import ENV_CONFIG, Settings, default_config_path, load_settings, validate_principal
from ..core.errors import ConfigError, KerbJupyterError
from ..core.mapping import validate_spec as validate_mapping
from . import metrics
from .handlers import RateLimiter
from .keeper import TicketKeeper
from .sources import build_source

ENV_ROOT_DIR = "KERB_JUPYTER_ROOT_DIR"  # the server's root_dir, for kernels' root-relative notebook tags


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
        f"Default: the environment variable {ENV_CONFIG}, else ~/.jupyter/kerb_jupyter.json. Only this file "
        "is read: it is never treated as Jupyter configuration, and nothing next to it is executed.",
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
        help="Renew when this fraction of the ticket lifetime has passed (0.1-0.95; up to 5% earlier, at "
        "random). Default 0.8.",
    )
    retry_interval = Float(
        60.0,
        config=True,
        help="Seconds before the first retry after a failed renewal; doubles per failure up to "
        "max_retry_interval, at most a third of the time the ticket has left, never less than this (plus "
        "0-5% jitter). Default 60.",
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
    max_concurrent_checks = Int(
        4, config=True,
        help="Cluster checks running at once (their own threads); more are answered 429 at once. Default 4.",
    )
    rejected_cooldown = Float(
        900.0, config=True,
        help="Seconds after the KDC rejected the credentials during which POST api/renew answers 409 without "
        "asking the KDC again (protects the AD account from lockout), unless the keytab, secret or "
        "configuration changes first. Default 900.",
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

    @validate("ticket_lifetime", "renewable_lifetime", "rejected_cooldown", "renew_min_interval",
              "check_min_interval")
    def _check_not_negative(self, proposal: Any) -> Any:
        value = proposal["value"]
        if value < 0:
            raise TraitError(f"KerbJupyterApp.{proposal['trait'].name} must be 0 or more, not {value}")
        return value

    @validate("max_concurrent_checks")
    def _check_pool(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if not 1 <= value <= 64:
            raise TraitError(f"KerbJupyterApp.max_concurrent_checks must be from 1 to 64, not {value}")
        return value

    # -- configuration: never fatal, never code ---------------------------------------------------------
    def load_config_file(self, suppress_errors: bool = True) -> None:  # type: ignore[override]
        """Jupyter's own config files only. ``config_file`` names our JSON settings, which JupyterApp would
        otherwise load as Jupyter configuration, executing a ``kerb_jupyter.py`` found next to it."""
        for name in ("jupyter_config", self.config_file_name):
            try:
                Application.load_config_file(self, name, path=self.config_file_paths)
            except ConfigFileNotFound:
                pass

    def _load_config(self, cfg: Config, section_names: list[str] | None = None,
                     traits: dict[str, Any] | None = None) -> None:
        """Load settings; a bad value is recorded (and reported by the status API) instead of failing the
        extension's load, which would leave its API answering 404."""
        try:
            super()._load_config(cfg, section_names, traits)
            return
        except TraitError:
            pass
        all_traits = traits if traits is not None else self.traits(config=True)
        for name, value in self._find_my_config(cfg).items():
            if name not in all_traits:
                continue
            try:
                super()._load_config(Config({type(self).__name__: {name: value}}), section_names,
                                     {name: all_traits[name]})
            except TraitError as err:
                self._setting_errors()[name] = str(err)

    def _setting_errors(self) -> dict[str, str]:
        if "_bad_settings" not in self.__dict__:
            self.__dict__["_bad_settings"] = {}
        return self.__dict__["_bad_settings"]  # type: ignore[no-any-return]

    # -- set-up -----------------------------------------------------------------------------------------
    def initialize_settings(self) -> None:
        self.keeper: TicketKeeper | None = None
        self.config_error: KerbJupyterError | None = None
        self.renew_limiter = RateLimiter(self.renew_min_interval)
        self.check_limiter = RateLimiter(self.check_min_interval)
        self.checks_running = 0
        self._collector: metrics.KeeperCollector | None = None
        self.settings.update(kerb_jupyter_app=self)
        root = getattr(self.serverapp, "root_dir", None)
        if root:
            os.environ[ENV_ROOT_DIR] = str(root)
        self._configure()

    def _configure(self) -> None:
        """Read the configuration and build the keeper; any problem becomes ``config_error``."""
        self.keeper, self.config_error = None, None
        self.settings_obj: Settings = Settings(path=None)
        self._stamp = _file_stamp(self._config_path())
        try:
            bad = self._setting_errors()
            if bad:
                name, text = next(iter(bad.items()))
                raise ConfigError(f"KerbJupyterApp.{name}: {text}")
            self.settings_obj = self._load()
            self.keeper = self._make_keeper(self.settings_obj)
        except KerbJupyterError as err:
            # Keep serving: the status page and API say what is wrong instead of a missing page.
            self.config_error = err
            self.log.error("configuration error: %s", err)
        except Exception as err:  # the extension must load whatever the configuration holds
            self.config_error = ConfigError(f"{self._config_path()}: unusable configuration "
                                            f"({type(err).__name__}: {str(err)[:200]})")
            self.log.error("configuration error: %s", self.config_error, exc_info=True)
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
            who = f"principal from identity ({', '.join(map(str, order))}) and mapping rules"
        self.log.info(
            "kerb_jupyter %s: %s, ticket from %s, cache %s, clusters: %s", __version__, who,
            self.keeper.state.source if self.keeper else "(nothing)", self.settings_obj.cache_path,
            ", ".join(self.settings_obj.clusters) or "(none)",
        )

    def _config_path(self) -> Path:
        return Path(self.config_file).expanduser() if self.config_file else default_config_path()

    def _load(self) -> Settings:
        settings = load_settings(self.config_file or None)
        # The loader checks all but the sections only the server uses: the source and the mapping rules.
        label = str(settings.path or "the configuration")
        checks.check_source(settings.source, label)
        validate_mapping(settings.mapping, label)
        return settings

    def _make_keeper(self, settings: Settings) -> TicketKeeper | None:
        if self.principal:
            validate_principal(self.principal, "KerbJupyterApp.principal")
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
            log=self.log,
            rejected_cooldown=self.rejected_cooldown,
        )

    async def reload_if_changed(self) -> bool:
        """Re-read the configuration file if it changed since it was read (a renew request applies an edit
        without a restart); returns whether it did, in which case the new keeper has made its first attempt."""
        if _file_stamp(self._config_path()) == self._stamp:
            return False
        self.log.info("the configuration %s changed: reading it again", self._config_path())
        await self._stop_keeper()
        self._configure()
        if self.keeper is not None and self.start_keeper:
            await self.keeper.start_now()  # the one attempt a renew request makes
            self._collector = metrics.register(self.keeper)
        return True

    def initialize_handlers(self) -> None:
        from .handlers import handlers

        self.handlers.extend(handlers(self.extension_url))

    def _start_keeper(self) -> None:
        if self.keeper is not None and self.start_keeper:
            self.keeper.start()
            self._collector = metrics.register(self.keeper)

    async def _stop_keeper(self) -> None:
        keeper = getattr(self, "keeper", None)  # absent when initialisation failed
        if keeper is not None:
            await keeper.stop()
        metrics.unregister(getattr(self, "_collector", None))
        self._collector = None

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        self._start_keeper()

    async def stop_extension(self) -> None:
        await self._stop_keeper()


def _file_stamp(path: Path) -> tuple[Any, ...]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def make_resolver(settings: Settings) -> Callable[[], tuple[dict[str, Any], str]]:
    """Identity chain + mapping rules as one call the keeper makes (in a thread: AWS calls block)."""
    from ..core.identity import IdentityResolver
    from ..core.mapping import map_identity

    resolver = IdentityResolver(settings.identity)

    def resolve() -> tuple[dict[str, Any], str]:
        identity = resolver.resolve()
        return identity.as_dict(), map_identity(identity.name, settings.mapping)

    return resolve


main = launch_new_instance = KerbJupyterApp.launch_instance
