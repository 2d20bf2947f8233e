"""One module per library whose private parts the proxy touches (rank 0: imports only the
library): :mod:`proxy.compat.aiohttp`, :mod:`proxy.compat.diskcache`, :mod:`proxy.compat.redispy`,
:mod:`proxy.compat.hashes` (the standard library's :mod:`hmac`). Nothing else in
``proxy/`` reaches into another library's underscored names; each touch is pinned by
``tests/unit/test_compat.py``, which names the version it was written against when a library
upgrade moves one."""
