"""JSON Schema string formats as regular expressions, for the grammar engine.

Each regex describes a subset of its format that the common validators (Python's `jsonschema` format checkers:
`datetime`, `ipaddress`, `uuid`, rfc3339-validator, fqdn, isoduration, rfc3986-validator) all accept, so a string
written under it validates wherever it is checked:
- dates are calendar-exact (no February 29 outside leap years, no 31st of a 30-day month) and start at year 0001
  (year 0000 and the leap second 60 are RFC 3339 but refused by Python's `datetime`);
- fractions of a second have at most 6 digits; hostnames have at most 3 labels, within DNS's 253 characters.

JSON schemas get these as `pattern`s in place of `format` (`schema_with_format_patterns`), and tool-call arguments
(`dgemma.serve.tools`) use them directly. Rust `regex` syntax, which Python's `re` reads the same way.
"""

from __future__ import annotations

from typing import Any

_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"  # every month has days 1-28
              r"|(?:0[13-9]|1[0-2])-(?:29|30)"  # all but February have 29 and 30
              r"|(?:0[13578]|1[02])-31)")
DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
DATE_TIME = rf"{DATE}T{TIME}"

_N = r"[0-9]{1,9}"
_DATE_PART = rf"(?:{_N}Y(?:{_N}M)?(?:{_N}D)?|{_N}M(?:{_N}D)?|{_N}D)"
_TIME_PART = rf"T(?:{_N}H(?:{_N}M)?(?:{_N}S)?|{_N}M(?:{_N}S)?|{_N}S)"
DURATION = rf"P(?:{_DATE_PART}(?:{_TIME_PART})?|{_TIME_PART}|{_N}W)"

_HEX = "[0-9a-fA-F]"
UUID = rf"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"


def _ipv6() -> str:
    """Eight groups of 1-4 hex digits, or fewer around one `::` (no embedded IPv4, no zone)."""
    h = f"{_HEX}{{1,4}}"
    forms = [f"(?:{h}:){{7}}{h}"]
    for before in range(8):  # `before` groups, `::`, at most 7 - before groups after
        head = "" if before == 0 else f"(?:{h}:){{{before - 1}}}{h}"
        after = 7 - before
        tail = "" if after == 0 else f"(?:(?:{h}:){{0,{after - 1}}}{h})?"
        forms.append(f"{head}::{tail}")
    return "(?:" + "|".join(forms) + ")"


IPV6 = _ipv6()
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = rf"{_LABEL}(?:\.{_LABEL}){{0,2}}"  # at most 3 labels: 191 characters, under DNS's 253
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
EMAIL = rf"{_ATOM}(?:\.{_ATOM}){{0,3}}@{HOSTNAME}"
_PCHAR = r"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
_REG_NAME = r"(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*"
_QUERY = rf"(?:{_PCHAR}|[/?])*"
URI = (rf"[A-Za-z][A-Za-z0-9+.-]*:(?://{_REG_NAME}(?::[0-9]{{0,5}})?(?:/{_PCHAR}*)*|/?(?:{_PCHAR}+(?:/{_PCHAR}*)*)?)"
       rf"(?:\?{_QUERY})?(?:#{_QUERY})?")

FORMATS = {"date": DATE, "time": TIME, "date-time": DATE_TIME, "duration": DURATION, "uuid": UUID, "ipv4": IPV4,
           "ipv6": IPV6, "hostname": HOSTNAME, "email": EMAIL, "uri": URI}

_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values, not schemas: never rewritten


def schema_with_format_patterns(schema: Any) -> Any:
    """A copy of `schema` where every string `format` named in `FORMATS` is replaced by its regex as a `pattern`
    (intersected with a `pattern` already there through `allOf`). Other formats are left for the engine to take
    or refuse."""
    if isinstance(schema, list):
        return [schema_with_format_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA_KEYWORDS else schema_with_format_patterns(v)) for k, v in schema.items()}
    name = out.get("format")
    if isinstance(name, str) and name in FORMATS:
        del out["format"]
        regex = f"^{FORMATS[name]}$"
        if "pattern" in out:
            out["allOf"] = [*out.get("allOf", []), {"pattern": regex}]
        else:
            out["pattern"] = regex
    return out
