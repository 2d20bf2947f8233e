"""An offline look-alike of the Kounta REST API, for demos, tests and benchmarks.

In-process::

    app = create_sandbox_app(SandboxConfig(rate_per_minute_bearer=5))
    state = app[SANDBOX_STATE]
    state.inject_status(503, count=2)  # faults, counters, tokens: see SandboxState

As a process: ``python -m proxy.sandbox --port 8089``; the same controls are then under
``/_sandbox/`` (``stats``, ``reset``, ``faults``, ``tokens``, ``touch``; see controls.py).
"""

from .app import create_sandbox_app
from .config import SandboxConfig
from .state import SANDBOX_STATE, SandboxState

__all__ = ["SANDBOX_STATE", "SandboxConfig", "SandboxState", "create_sandbox_app"]
