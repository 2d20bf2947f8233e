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
    BudgetSettings,
    CallerSettings,
    ClassWeights,
    InboundSettings,
    LogSettings,
    PagingSettings,
    RetrySettings,
)
from proxy.settings.live import (
    CLASS_SHARES,
    CREDENTIALS,
    RATES,
    LiveAccount,
    LiveBudget,
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
    CacheRule,
    CacheSettings,
    ServerSettings,
    Settings,
    SharedBackendName,
    SharedSettings,
    UpstreamSettings,
)
from proxy.settings.webhooks import WebhookSettings, WebhookTopic

__all__ = [
    "CLASS_SHARES",
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
    "ClassWeights",
    "ConfigError",
    "ConfigErrors",
    "InboundSettings",
    "Invalid",
    "LiveAccount",
    "LiveBudget",
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
    "WebhookSettings",
    "WebhookTopic",
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
