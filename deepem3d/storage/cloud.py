"""Cloud buckets: checked once per process before a layer or model in them is used.

CloudFiles retries a failing request for minutes and then raises from deep inside a thread
pool; a bucket that does not exist, an endpoint that does not answer or missing credentials
would show as that. `check_bucket(path)` asks the bucket itself first, with short timeouts and
two tries, and turns each failure into a one-line InputError that names the bucket (never a
credential).

Where things come from, as CloudVolume and boto3 read them:
- s3://: credentials from CloudVolume's secrets (~/.cloudvolume/secrets/aws-secret.json), else
  boto3's chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, IRSA's web identity,
  the instance role); an S3-compatible endpoint (MinIO, Ceph, moto) from AWS_ENDPOINT_URL_S3
  (or AWS_ENDPOINT_URL); the region from AWS_DEFAULT_REGION.
- gs://: CloudVolume's google-secret.json, else Google's default credentials (Workload
  Identity, GOOGLE_APPLICATION_CREDENTIALS); an emulator from STORAGE_EMULATOR_HOST.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from deepem3d.errors import InputError, ServiceUnavailable

if TYPE_CHECKING:
    from botocore.config import Config

#: seconds to wait for a connection to an AWS endpoint (S3 or SQS), and tries: an endpoint
#: that does not answer is an error within seconds (botocore's defaults wait minutes)
CONNECT_SECONDS = 3
ATTEMPTS = 2
#: seconds a call may wait for its answer: above an SQS long poll's wait (the worker's 2 s)
READ_SECONDS = 30


def boto_config() -> Config:
    """botocore's client settings for every AWS call deepem3d makes itself: the bounds above."""
    from botocore.config import Config

    return Config(connect_timeout=CONNECT_SECONDS, read_timeout=READ_SECONDS,
                  retries={"max_attempts": ATTEMPTS, "mode": "standard"})


def prepare_environment() -> None:
    """CloudFiles reads AWS_SESSION_TOKEN whenever keys are in the environment, and fails with
    a KeyError when it is missing (long-lived keys have none): an empty token is what botocore
    does without one."""
    if "AWS_ACCESS_KEY_ID" in os.environ and "AWS_SECRET_ACCESS_KEY" in os.environ:
        os.environ.setdefault("AWS_SESSION_TOKEN", "")


def unreadable_secret(err: BaseException) -> str | None:
    """Where importing CloudFiles failed on a secret file of its own (it reads
    google-secret.json when imported, for its project_id): one line naming that file; else
    None. Without it every command, `--help` too, ended in a JSON or KeyError traceback."""
    import traceback

    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)
              if frame.f_code.co_filename.endswith(os.path.join("cloudfiles", "secrets.py"))]
    if not frames or not isinstance(err, (ValueError, KeyError)):  # JSONDecodeError: a Value
        return None
    files = [v for k, v in frames[-1].f_locals.items()  # the reading function's own path
             if k != "__file__" and isinstance(v, str) and os.path.isfile(v)]
    detail = f"no {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
    return (f"{files[0] if files else 'a CloudFiles secret file'} is not a readable secret "
            f"({detail}): CloudVolume's google-secret.json is a service account's JSON key, "
            "with its project_id")


def bucket_of(path: str) -> tuple[str, str] | None:
    """(scheme, bucket) of an s3:// or gs:// path (precomputed:// dropped), else None."""
    path = str(path)
    if path.startswith("precomputed://"):
        path = path[len("precomputed://"):]
    scheme, sep, rest = path.partition("://")
    if not sep or scheme not in ("s3", "gs") or not rest.split("/", 1)[0]:
        return None
    return scheme, rest.split("/", 1)[0]


#: the schemes a layer or checkpoint path may have (CloudFiles' own, less those this project
#: never tests); another one would be read as a local folder named after it
SCHEMES = ("file", "gs", "s3", "http", "https", "mem")


def check_bucket(path: str) -> None:
    """A path's scheme is one CloudFiles reads, and for an s3:// or gs:// path its bucket
    exists and answers with the credentials found (once per bucket and process); else a
    one-line InputError."""
    scheme, sep, _ = str(path).removeprefix("precomputed://").partition("://")
    if sep and scheme not in SCHEMES:
        raise InputError(f"{path}: unknown scheme {scheme}:// (layers and checkpoints are "
                         f"local paths or {', '.join(s + '://' for s in SCHEMES)})")
    found = bucket_of(path)
    if found is not None:
        _check(*found)
    elif scheme in ("http", "https"):
        from urllib.parse import urlsplit
        from urllib.request import getproxies, proxy_bypass

        try:
            url = urlsplit(str(path).removeprefix("precomputed://"))
            port = url.port or (443 if scheme == "https" else 80)
        except ValueError as err:
            raise InputError(f"{path}: not a URL ({err})") from None
        host = url.hostname or ""
        if scheme in getproxies() and not proxy_bypass(host):
            return  # reached through a proxy, as CloudFiles will: nothing to check directly
        _check_host(host, port, f"{scheme}://{url.netloc}")


@functools.cache
def _check_host(host: str, port: int, where: str) -> None:
    """An http(s) server that does not take connections is a one-line error in seconds
    (CloudFiles retries it for minutes, then raises from its thread pool)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise ServiceUnavailable(f"{where}: the server does not answer "
                                 f"({err.strerror or err})") from None


@functools.cache
def _check(scheme: str, bucket: str) -> None:
    prepare_environment()
    if scheme == "s3":
        _check_s3(bucket)
    else:
        _check_gs(bucket)


def _check_s3(bucket: str) -> None:
    import boto3
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )
    from cloudfiles.secrets import aws_credentials

    secrets = aws_credentials(bucket, "aws")  # CloudVolume's secret file, else the environment
    config = boto_config()
    where = f"s3://{bucket}"
    try:
        client = boto3.client(
            "s3", config=config, aws_access_key_id=secrets.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=secrets.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=secrets.get("AWS_SESSION_TOKEN") or None,
            region_name=secrets.get("AWS_DEFAULT_REGION") or None)
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise InputError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, a profile, CloudVolume's aws-secret.json, or "
                         "the pod's role)") from None
    except EndpointConnectionError as err:
        raise ServiceUnavailable(f"{where}: the S3 endpoint does not answer ({err})") from None
    except ClientError as err:
        unavailable(where, err)
        code = str(err.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise InputError(f"{where}: no such bucket (create it, or check the path)") \
                from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise InputError(f"{where}: access denied (the credentials found may not use "
                             "this bucket)") from None
        raise InputError(f"{where}: {code}: {err.response.get('Error', {}).get('Message')}") \
            from None
    except BotoCoreError as err:
        unavailable(where, err)
        raise InputError(f"{where}: {err}") from None


#: AWS error codes of a service that may answer a moment later
THROTTLED = ("Throttling", "ThrottlingException", "RequestThrottled", "SlowDown",
             "RequestLimitExceeded", "ServiceUnavailable", "InternalError", "InternalFailure")


def unavailable(where: str, err: Exception) -> None:
    """ServiceUnavailable for a botocore error of a service that did not answer (no
    connection, a timeout, throttling, a 5xx); else nothing: the caller words the rest."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, BotoConnectionError | HTTPClientError):
        raise ServiceUnavailable(f"{where}: {err}") from None
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if str(error.get("Code")) in THROTTLED or int(status) >= 500:
            raise ServiceUnavailable(f"{where}: {error.get('Code')}: "
                                     f"{error.get('Message')}") from None


@contextlib.contextmanager
def answered(where: str) -> Iterator[None]:
    """Within it, the error of a service that did not answer (CloudFiles raises it once its
    retries are spent: a bucket's endpoint lost after its check) is ServiceUnavailable naming
    `where`: botocore's (S3), and requests', urllib3's and Google's (GCS: CloudFiles reads
    gs:// through requests and google-cloud-storage); any other error passes unchanged."""
    try:
        yield
    except Exception as err:
        if type(err).__module__.startswith("botocore."):
            unavailable(where, err)
        if _google_did_not_answer(err):
            raise ServiceUnavailable(f"{where}: the storage endpoint does not answer "
                                     f"({type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else ''})") from None
        raise


def _google_did_not_answer(err: Exception) -> bool:
    """Whether `err` is a gs:// read's or write's that no answer caused: no connection or a
    timeout (requests', urllib3's, google-auth's transport), a 5xx or throttling (google's
    api_core), or Google's retries spent on one of those."""
    module = type(err).__module__
    if module.startswith(("requests.", "urllib3.")):
        import requests
        import urllib3.exceptions

        if isinstance(err, requests.exceptions.SSLError | urllib3.exceptions.SSLError) or \
                isinstance(getattr(err, "reason", None), urllib3.exceptions.SSLError):
            return False  # a certificate refused: the same on every retry
        return isinstance(err, requests.ConnectionError | requests.Timeout
                          | urllib3.exceptions.MaxRetryError | urllib3.exceptions.TimeoutError
                          | urllib3.exceptions.ProtocolError)
    if module.startswith("google."):
        from google.api_core import exceptions as google_errors
        from google.auth.exceptions import TransportError

        return isinstance(err, google_errors.ServerError | google_errors.TooManyRequests
                          | google_errors.RetryError | TransportError)
    return False


def _check_gs(bucket: str) -> None:
    from google.api_core import exceptions as google_errors
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    where = f"gs://{bucket}"
    try:
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project="emulator", credentials=AnonymousCredentials())
        else:
            from cloudfiles.secrets import google_credentials

            project, credentials = google_credentials(bucket)
            client = storage.Client(project=project, credentials=credentials)
        # listing needs storage.objects.list, which object roles grant (getting the bucket
        # itself needs storage.buckets.get, which roles/storage.objectAdmin does not)
        list(client.list_blobs(bucket, max_results=1, timeout=(CONNECT_SECONDS, READ_SECONDS),
                               retry=None))
    except DefaultCredentialsError:
        raise InputError(f"{where}: no Google credentials found (CloudVolume's "
                         "google-secret.json, GOOGLE_APPLICATION_CREDENTIALS, or Workload "
                         "Identity)") from None
    except google_errors.NotFound:
        raise InputError(f"{where}: no such bucket (create it, or check the path)") from None
    except google_errors.Forbidden:
        raise InputError(f"{where}: access denied (the credentials found may not use this "
                         "bucket)") from None
    except (google_errors.ServerError, google_errors.TooManyRequests, google_errors.RetryError,
            OSError) as err:
        raise ServiceUnavailable(f"{where}: the storage endpoint does not answer "
                                 f"({type(err).__name__})") from None
    except google_errors.GoogleAPIError as err:
        raise InputError(f"{where}: the storage endpoint refused the request "
                         f"({type(err).__name__}: {err})") from None
