"""Remote submission with Ray Jobs: the spec and the project's packages go to the cluster as the
job's working_dir, and the job runs `avtune sweep` (or `train`) there.

Ray's token authentication stays on: the token is read the way Ray reads it (RAY_AUTH_TOKEN,
then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token) and sent as a Bearer header,
which `JobSubmissionClient` does not do by itself unless RAY_AUTH_MODE=token is set.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
import re
import stat
from urllib.parse import urlsplit

from ray.job_submission import JobSubmissionClient

from orchestrator.specs import ExperimentSpec, dump_spec_yaml
from orchestrator.tracking import redact_uri, split_credentials
from workers.uris import secret_in_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "workers", "orchestrator")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class SubmitError(ValueError):
    """A submission refused before anything is sent; the message says which option or file."""


MAX_TOKEN_BYTES = 64 * 1024  # Ray's tokens are ~64 characters; a bigger "token file" is something else


def read_token_file(path: Path, what: str) -> str:
    """A token file's text: a regular file of at most MAX_TOKEN_BYTES. Opened without blocking and checked
    before reading: a FIFO would hang the command, /dev/zero would fill the memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise SubmitError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SubmitError(f"{what}: {path} is not a regular file (a FIFO, device or folder); give the token's file")
        if info.st_size > MAX_TOKEN_BYTES:
            raise SubmitError(f"{what}: {path} is {info.st_size} bytes, not a token (at most {MAX_TOKEN_BYTES})")
        data = os.read(fd, MAX_TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise SubmitError(f"{what}: {path} is not text") from None


def read_auth_token(token_file: Path | None = None) -> str:
    """The Ray auth token, read the way Ray reads it; a clear error when there is none (token auth stays
    on, and a job submitted without a token would only be refused by the cluster later, or not at all)."""
    if token_file is not None:
        token = read_token_file(Path(token_file), "--token-file")
        if not token:
            raise SubmitError(f"--token-file: {token_file} is empty")
        return token
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
    if path.exists() and (token := read_token_file(path, "RAY_AUTH_TOKEN_PATH")):
        return token
    raise SubmitError("no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, put it in ~/.ray/auth_token, "
                      "or pass --token-file (the cluster's token, e.g. from the head node's ~/.ray/auth_token)")


# What an address may hold: scheme, host (name, IPv4 or [IPv6]) and port. Anything else (userinfo, a
# backslash, a path) is where two URL parsers disagree about the host (`urllib.parse` and the HTTP client's
# urllib3 read "http://a:1\\@b:2" as host b and host a): refused, and the client gets the address rebuilt.
_ADDRESS = re.compile(r"^(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])"
                      r"(?::(?P<port>[0-9]{1,5}))?/?$")


def jobs_address(address: str) -> tuple[str, str]:
    """(scheme, rebuilt "scheme://host[:port]") of a Ray Jobs address, or a SubmitError naming --address."""
    found = _ADDRESS.match(address.strip())
    shown = redact_uri(address)
    if found is None:
        raise SubmitError(f"--address {shown!r}: give the Ray dashboard's address as http(s)://HOST[:PORT], "
                          "without a user name, path, backslash or spaces")
    scheme = (found["scheme"] or "http").lower()
    if scheme not in ("http", "https"):
        raise SubmitError(f"--address {shown!r}: scheme {scheme}:// is not Ray Jobs' (ray:// is Ray Client); give "
                          "the dashboard's address, http(s)://HOST:8265")
    port = found["port"]
    if port is not None and not 0 < int(port) < 65536:
        raise SubmitError(f"--address {shown!r}: port {port} is not a TCP port")
    return scheme, f"{scheme}://{found['host'].lower()}" + (f":{port}" if port else "")


def check_transport(address: str, allow_insecure_http: bool = False) -> str:
    """The token travels as a Bearer header: never in clear over the network unless the user says so.
    Returns the address rebuilt from its host and port (`jobs_address`), the one to connect to."""
    scheme, rebuilt = jobs_address(address)
    host = urlsplit(rebuilt).hostname or ""
    if scheme == "http" and host not in LOOPBACK_HOSTS and not allow_insecure_http:
        raise SubmitError(f"--address {address}: plain http to a non-loopback host would send the Ray auth token in "
                          "clear; use https://, an SSH tunnel to 127.0.0.1, or pass --allow-insecure-http")
    return rebuilt


def job_client(address: str, token_file: Path | None = None, allow_insecure_http: bool = False) -> JobSubmissionClient:
    """The one way avtune reaches Ray Jobs: the address checked and rebuilt (`check_transport`), the token read."""
    rebuilt = check_transport(address, allow_insecure_http)
    token = read_auth_token(token_file)
    return JobSubmissionClient(rebuilt, headers={"Authorization": f"Bearer {token}"})


def job_tracking(spec: ExperimentSpec, tracking_uri: str | None) -> tuple[ExperimentSpec, dict[str, str]]:
    """The spec the job runs and the job's environment for `--tracking-uri`: the option wins over the spec's
    field (the job reads the spec's field first), and its credentials go in MLflow's own variables, never in
    the uploaded spec.yaml or a URI that the job prints and logs."""
    if not tracking_uri:
        return spec, {}
    uri, credentials = split_credentials(tracking_uri)
    if (found := secret_in_uri(uri)) is not None:  # a query token cannot move into MLflow's variables
        raise SubmitError(f"--tracking-uri {redact_uri(uri)}: holds {found}, which the job would log with its spec; "
                          "give the credentials in user:password@ form or MLFLOW_TRACKING_TOKEN")
    tracking = spec.tracking.model_copy(update={"tracking_uri": uri})
    return spec.model_copy(update={"tracking": tracking}), {"MLFLOW_TRACKING_URI": uri, **credentials}


def submit_spec(spec: ExperimentSpec, address: str, tracking_uri: str | None = None, command: str = "sweep",
                token_file: Path | None = None, pip: list[str] | None = None, agent_wait_seconds: float = 90,
                allow_insecure_http: bool = False) -> str:
    """Submit a validated spec as a Ray job; returns the job id.

    The job's working_dir holds only the three packages and the spec, so nothing else of the
    local checkout (virtualenv, runs, data) is uploaded.
    """
    if command == "sweep" and spec.search is not None:
        from orchestrator.sweep import check_search

        check_search(spec)  # the same up-front check `avtune sweep` makes, before anything is uploaded
    client = job_client(address, token_file, allow_insecure_http)
    spec, env_vars = job_tracking(spec, tracking_uri)
    staging = Path(tempfile.mkdtemp(prefix="avtune-submit-"))
    try:
        for pkg in PACKAGES:
            shutil.copytree(PROJECT_ROOT / pkg, staging / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        (staging / "spec.yaml").write_text(dump_spec_yaml(spec))
        runtime_env = {"working_dir": str(staging), "env_vars": env_vars}
        if pip:
            runtime_env["pip"] = pip
        # argv list joined by Ray into a shell line: only fixed words here, never spec values. --verbose: a
        # job's log (`avtune jobs logs`) is where its Ray output belongs, not a file on the head node.
        entrypoint = f"python -m orchestrator.cli {command} spec.yaml --verbose"
        deadline = time.monotonic() + agent_wait_seconds
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                         metadata={"avtune.spec": spec.name, "avtune.command": command})
            except RuntimeError as err:
                # A freshly started head answers 500 "No available agent" until its job agent is up.
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
