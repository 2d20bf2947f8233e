"""Typed, frozen settings: defaults, then a TOML file, then ``KOUNTA_PROXY_*`` variables.

A package: :mod:`~proxy.settings.base` (errors, :class:`Secret`), the sections
(:mod:`~proxy.settings.sections`, :mod:`~proxy.settings.handling`), what a reload may change
(:mod:`~proxy.settings.live`), loading (:mod:`~proxy.settings.load`) and showing
(:mod:`~proxy.settings.render`). Everything public is re-exported here: ``from
proxy.settings import Settings`` is how the rest of the proxy imports it.
"""

from proxy.settings.base import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    MASK,
    ConfigError,
    ConfigErrors,
    Invalid,
    Secret,
    is_loopback_host,
)
from proxy.settings.handling import (
    NEVER_RETRIED,
    RETRYABLE,
    CallerSettings,
    InboundSettings,
    LogSettings,
    PagingSettings,
    RetrySettings,
)
from proxy.settings.live import (
    CREDENTIALS,
    RATES,
    LiveAccount,
    LiveCache,
    LiveSettings,
    applied,
    live_keys,
    live_of,
    with_live,
)
from proxy.settings.load import (
    CONFIG_FILE_LIMIT,
    SECRET_FILE_LIMIT,
    build,
    convert,
    load,
    merge_env,
    read_toml,
)
from proxy.settings.render import masked, to_toml
from proxy.settings.sections import (
    UNIX_PATH_MAX,
    AccountSettings,
    AdminSettings,
    AuthSettings,
    BudgetSettings,
    CacheRule,
    CacheSettings,
    ServerSettings,
    Settings,
    SharedBackendName,
    SharedSettings,
    UpstreamSettings,
)

__all__ = [
    "CONFIG_FILE_LIMIT",
    "CREDENTIALS",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "MASK",
    "NEVER_RETRIED",
    "RATES",
    "RETRYABLE",
    "SECRET_FILE_LIMIT",
    "UNIX_PATH_MAX",
    "AccountSettings",
    "AdminSettings",
    "AuthSettings",
    "BudgetSettings",
    "CacheRule",
    "CacheSettings",
    "CallerSettings",
    "ConfigError",
    "ConfigErrors",
    "InboundSettings",
    "Invalid",
    "LiveAccount",
    "LiveCache",
    "LiveSettings",
    "LogSettings",
    "PagingSettings",
    "RetrySettings",
    "Secret",
    "ServerSettings",
    "Settings",
    "SharedBackendName",
    "SharedSettings",
    "UpstreamSettings",
    "applied",
    "build",
    "convert",
    "is_loopback_host",
    "live_keys",
    "live_of",
    "load",
    "masked",
    "merge_env",
    "read_toml",
    "to_toml",
    "with_live",
]
