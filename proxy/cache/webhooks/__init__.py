"""Webhooks: freshness pushed by Kounta (docs/webhooks.md).

:mod:`.payload` reads a delivery (pure, tolerant), :mod:`.purges` says what it invalidates
(pure), :mod:`.receiver` is the listener that checks, applies and answers, :mod:`.health`
decides whether an account's feed is trusted, :mod:`.refetch` fetches again what callers
read lately once a change dropped it, and :mod:`.registration` keeps the account's
webhooks registered (the ``webhooks`` CLI).
"""
