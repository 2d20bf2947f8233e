"""HTTP dates and delays, parsed in one place (RFC 9110 5.6.7 and 10.2.3).

A recipient must accept the three HTTP-date forms and nothing else; anything that only
looks like one (a two-digit year in the IMF form, dashes in it, a zone other than GMT,
extra or missing spaces, a one-digit hour, ...) is invalid here, and the caller decides
what invalid means (an invalid ``Expires`` is already expired, RFC 9111 5.3).
"""

from __future__ import annotations

import calendar
import math
import re
import time

MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(?P<month>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})"
# Sun, 06 Nov 1994 08:49:37 GMT
IMF_FIXDATE = re.compile(rf"{_DAY}, (?P<day>\d{{2}}) {_MONTH} (?P<year>\d{{4}}) {_TIME} GMT")
# Sunday, 06-Nov-94 08:49:37 GMT
RFC850 = re.compile(rf"{_LONG_DAY}, (?P<day>\d{{2}})-{_MONTH}-(?P<year>\d{{2}}) {_TIME} GMT")
# Sun Nov  6 08:49:37 1994
ASCTIME = re.compile(rf"{_DAY} {_MONTH} (?P<day>[ \d]\d) {_TIME} (?P<year>\d{{4}})")
_FORMS = (IMF_FIXDATE, RFC850, ASCTIME)


def http_date(value: str | None, now: float | None = None) -> float | None:
    """``value`` as epoch seconds, or None unless it is exactly one of the three forms.

    ``now`` (epoch seconds) resolves rfc850's two-digit year: a year that would be more
    than 50 years in the future is taken as the past century's (RFC 9110 5.6.7).
    """
    if not value:
        return None
    for form in _FORMS:
        found = form.fullmatch(value)
        if found is not None:
            return _epoch(found, now)
    return None


def _epoch(found: re.Match[str], now: float | None) -> float | None:
    year = int(found["year"])
    if len(found["year"]) == 2:
        this_year = _year_of(now)
        year += this_year - this_year % 100
        if year > this_year + 50:
            year -= 100
    day, hour, minute = int(found["day"].strip()), int(found["hour"]), int(found["minute"])
    second = min(int(found["second"]), 59)  # a leap second counts as the one before
    month = MONTHS[found["month"]]
    if not (1 <= day <= calendar.monthrange(year, month)[1] and hour < 24 and minute < 60):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def _year_of(now: float | None) -> int:
    return time.gmtime(now).tm_year


# RFC 9110 10.2.3 delay-seconds: ASCII digits (str.isdigit() also takes "²", which float()
# refuses with an exception).
DELAY_SECONDS = re.compile(r"[0-9]+")


def retry_after(value: str | None, wall_now: float) -> float | None:
    """Seconds a ``Retry-After`` asks for (delay-seconds or an HTTP-date), or None.

    Not capped here: the caller decides how much of a long ask it honours.
    """
    value = (value or "").strip()
    if not value:
        return None
    if DELAY_SECONDS.fullmatch(value):
        return float(value)  # inf for a thousand digits, never an exception
    at = http_date(value, wall_now)
    return None if at is None else at - wall_now


def whole_seconds(seconds: float) -> int:
    """A wait as Retry-After's whole seconds, rounded up, but not for float noise:
    ``(now + 100.0) - now`` may be 100.00000000000001, which is 100, not 101."""
    return max(0, math.ceil(round(seconds, 6)))
