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
from urllib.parse import urlparse

from ray.job_submission import JobSubmissionClient

from orchestrator.specs import ExperimentSpec, dump_spec_yaml
from orchestrator.tracking import split_credentials

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "workers", "orchestrator")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class SubmitError(ValueError):
    """A submission refused before anything is sent; the message says which option or file."""


def read_auth_token(token_file: Path | None = None) -> str:
    """The Ray auth token, read the way Ray reads it; a clear error when there is none (token auth stays
    on, and a job submitted without a token would only be refused by the cluster later, or not at all)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise SubmitError(f"--token-file: cannot read {token_file}: {err.strerror or err}") from None
        if not token:
            raise SubmitError(f"--token-file: {token_file} is empty")
        return token
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    raise SubmitError("no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, put it in ~/.ray/auth_token, "
                      "or pass --token-file (the cluster's token, e.g. from the head node's ~/.ray/auth_token)")


def check_transport(address: str, allow_insecure_http: bool = False) -> None:
    """The token travels as a Bearer header: never in clear over the network unless the user says so."""
    parsed = urlparse(address if "://" in address else f"http://{address}")
    if parsed.scheme == "http" and (parsed.hostname or "") not in LOOPBACK_HOSTS and not allow_insecure_http:
        raise SubmitError(f"--address {address}: plain http to a non-loopback host would send the Ray auth token in "
                          "clear; use https://, an SSH tunnel to 127.0.0.1, or pass --allow-insecure-http")


def job_client(address: str, token_file: Path | None = None, allow_insecure_http: bool = False) -> JobSubmissionClient:
    check_transport(address, allow_insecure_http)
    token = read_auth_token(token_file)
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})


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
    staging = Path(tempfile.mkdtemp(prefix="avtune-submit-"))
    try:
        for pkg in PACKAGES:
            shutil.copytree(PROJECT_ROOT / pkg, staging / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        (staging / "spec.yaml").write_text(dump_spec_yaml(spec))
        env_vars = {}
        if tracking_uri:
            # Credentials go in MLflow's own variables, not inside a URI that the job prints and logs.
            uri, credentials = split_credentials(tracking_uri)
            env_vars.update(MLFLOW_TRACKING_URI=uri, **credentials)
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
