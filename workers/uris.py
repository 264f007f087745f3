"""Credentials in URIs: found, split off and hidden by one set of functions (stdlib only, torch-free: the
spec models at the bottom of the dependency chain use them too).

A tracking URI may carry a password (`http://alice:s3cret@host`), a bare token (`https://TOKEN@host`) or
a token in its query (`?token=...`). Every URI avtune prints, logs, stores or uploads goes through
`redact_uri` (to show it) or `split_credentials` (to use it); a spec may not hold one (`secret_in_uri`):
MLflow params and artifacts cannot be edited afterwards.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

# Query keys whose values are secrets (token=, api_key=, X-Amz-Signature=, password=, ...).
SECRET_QUERY_KEY = re.compile(r"token|key|secret|pass|pwd|sig|auth|cred", re.IGNORECASE)
# "scheme://userinfo@" found without a URL parser: a URI that urlsplit refuses is still redacted.
_USERINFO = re.compile(r"(//)[^/?#@]*@")
HIDDEN = "***"


def _userinfo(netloc: str) -> tuple[str | None, str]:
    """(userinfo or None, host[:port]) of a netloc, split at its last "@" as HTTP clients do."""
    if "@" not in netloc:
        return None, netloc
    userinfo, _, host = netloc.rpartition("@")
    return userinfo, host


def _secret_query_keys(query: str) -> list[str]:
    return [k for k, _ in parse_qsl(query, keep_blank_values=True) if SECRET_QUERY_KEY.search(k)]


def secret_in_uri(uri: str) -> str | None:
    """What in `uri` is a credential ("a user name or password", "the query key 'token'"), or None."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        parts = None
    if parts is None:
        return "a user name or password" if _USERINFO.search(uri) else None
    userinfo, _ = _userinfo(parts.netloc)
    if userinfo is not None:
        return "a user name or password"
    keys = _secret_query_keys(parts.query)
    return f"the query key {keys[0]!r}" if keys else None


def redact_uri(uri: str) -> str:
    """`uri` fit to print, log or put in a report: a password becomes ***, a bare user or token before "@"
    becomes ***, and so does the value of every secret-looking query key. Never raises."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: hide whatever sits before an "@"
        return _USERINFO.sub(rf"\1{HIDDEN}@", uri)
    userinfo, host = _userinfo(parts.netloc)
    netloc = parts.netloc
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{host}" if colon else f"{HIDDEN}@{host}"
    query = parts.query
    if _secret_query_keys(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, HIDDEN if SECRET_QUERY_KEY.search(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # untouched: urlunsplit would also rewrite "sqlite:////abs/path" as "sqlite://abs/path"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str, uri: str | None) -> str:
    """`text` (an error message, a log line) with `uri`'s secrets hidden wherever the URI or its password
    appears in it."""
    if not uri:
        return text
    text = text.replace(uri, redact_uri(uri))
    try:
        parts = urlsplit(uri)
    except ValueError:
        return text
    userinfo, _ = _userinfo(parts.netloc)
    secrets = [v for k, v in parse_qsl(parts.query) if SECRET_QUERY_KEY.search(k) and v]
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        secrets += [password, unquote(password)] if colon else [user, unquote(user)]
    for secret in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An http(s) URI without its user:password, and MLflow's own variables for them (MLFLOW_TRACKING_USERNAME
    / _PASSWORD; a bare token before "@" becomes MLFLOW_TRACKING_TOKEN, sent as a Bearer header), so the
    credentials never travel inside a URI that gets printed or logged. Other schemes (a database URI) are
    returned as they are: their driver needs them in the URI; show them only through `redact_uri`."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri, {}
    userinfo, host = _userinfo(parts.netloc)
    if userinfo is None or parts.scheme.lower() not in ("http", "https"):
        return uri, {}
    user, colon, password = userinfo.partition(":")
    env = ({"MLFLOW_TRACKING_USERNAME": unquote(user), "MLFLOW_TRACKING_PASSWORD": unquote(password)} if colon
           else {"MLFLOW_TRACKING_TOKEN": unquote(user)})
    return urlunsplit(parts._replace(netloc=host)), env
