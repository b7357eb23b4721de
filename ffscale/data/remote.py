"""Shard sets under a URL (`https://`, `s3://`, `gs://`): the one place ffscale talks to fsspec.

fsspec picks the client by the URL's scheme (s3fs for s3://, gcsfs for gs://, its own aiohttp client
for http(s)://); credentials come from where those clients look (AWS_* variables and files, GCP's
application default credentials, `user:password@` in an http URL), never from ffscale's config.
Every read is a byte range (`cat_file(url, start, end)`), so a read that fails can be repeated from
where it stood. What fails is said in one line naming the shard and its URL with credentials masked:
a missing object or a refusal (404, 403) and a truncated object are data errors (exit 2, a rerun
meets the same bucket); a server that does not answer is a storage error (exit 1, worth a retry),
raised after a few tries.
"""

from __future__ import annotations

import errno
import os
import posixpath
import time
from urllib.parse import urlsplit, urlunsplit

from ffscale.errors import DataError, StorageError
from ffscale.util.secrets import redact

SCHEMES = ("http", "https", "s3", "gs", "gcs")
TRIES = 3  # a request that fails for want of an answer is tried this often before the job stops
BACKOFF_S = 0.5  # then 1 s, 2 s: a server restarting within seconds is ridden out


def is_remote(root: object) -> bool:
    return isinstance(root, str) and urlsplit(root).scheme in SCHEMES and "://" in root


def join(root: str, rel: str) -> str:
    """`rel` (a manifest's shard file, which may be `../x.tar` for shards indexed in place) under `root`."""
    u = urlsplit(root)
    return urlunsplit(u._replace(path=posixpath.normpath(posixpath.join(u.path or "/", rel))))


def masked(url: str) -> str:
    return redact(url)


_FS: dict[tuple[str, int], object] = {}


def filesystem(url: str):
    """(fsspec filesystem, path it knows the URL by); one filesystem per scheme and process (a forked
    DataLoader worker makes its own: fsspec's event loop does not survive a fork)."""
    import fsspec

    proto = urlsplit(url).scheme
    key = (proto, os.getpid())
    if key not in _FS:
        try:
            _FS[key] = fsspec.filesystem(proto, **_options(proto))
        except ImportError as e:  # fsspec's registry names the package: "Install gcsfs to access ..."
            raise DataError(f"{masked(url)}: {e}") from None
    fs = _FS[key]
    return fs, fs._strip_protocol(url) if proto in ("s3", "gs", "gcs") else url


def _options(proto: str) -> dict:
    """Timeouts for a server that accepts a connection and then says nothing: fsspec's http client is an
    aiohttp session with aiohttp's default of 300 s a request (fsspec/implementations/http.py,
    `client_kwargs`); s3fs already sets 5 s to connect and 15 s between reads (s3fs/core.py)."""
    if proto in ("http", "https"):
        import aiohttp

        return {
            "client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)}
        }
    return {}


def failure(error: BaseException, url: str, what: str, shard: bool = True) -> DataError:
    """The one line for a failed request: DataError (exit 2) where a rerun would meet the same answer,
    StorageError (exit 1) where the server did not answer."""
    name = f"{'shard ' if shard else ''}{masked(url)}"
    status = _status(error)
    if isinstance(error, FileNotFoundError) or status == 404:
        return DataError(f"{name}: not found (404) while {what}")
    if isinstance(error, PermissionError) or status in (401, 403):
        return DataError(f"{name}: access denied ({status or 403}) while {what}; check the credentials")
    if status == 416:
        return DataError(f"{name}: shorter than its manifest says (truncated or replaced) while {what}")
    return StorageError(
        f"{name}: storage did not answer while {what} ({_first_line(error)}); rerun to resume"
    )


def _status(error: BaseException) -> int | None:
    """The HTTP status a failed request carries: aiohttp.ClientResponseError's `status` (fsspec's http
    raise_for_status); s3fs turns S3's InvalidRange (416) into OSError(EINVAL, "The requested range is
    not satisfiable") (s3fs/errors.py, ERROR_CODE_TO_EXCEPTION); gcsfs raises a plain OSError("Forbidden:
    ...") for 403 and its HttpError, with `code`, for the other statuses it does not map to a builtin
    (gcsfs/retry.py, validate_response)."""
    if isinstance(error, OSError) and error.errno == errno.EINVAL and "range" in str(error).lower():
        return 416
    if type(error) is OSError and str(error).startswith("Forbidden: "):
        return 403
    for key in ("status", "code"):
        value = getattr(error, key, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _transient(error: BaseException) -> bool:
    status = _status(error)
    if isinstance(error, (FileNotFoundError, PermissionError)) or status in (401, 403, 404, 416):
        return False
    return not isinstance(error, (DataError, ValueError, TypeError))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return masked(f"{type(error).__name__}: {text[0] if text else ''}"[:200])


def call(fn, url: str, what: str, shard: bool = True):
    """fn() tried TRIES times while the storage does not answer; its failure as one line."""
    for k in range(TRIES):
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or k == TRIES - 1:
                raise failure(e, url, what, shard) from None
            time.sleep(BACKOFF_S * 2**k)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of the object; fewer only where it ends before `end`."""
    fs, path = filesystem(url)
    got = call(lambda: fs.cat_file(path, start=start, end=end), url, f"reading bytes {start}-{end}")
    if len(got) > end - start:  # a server that ignored the Range header sent the whole object
        raise DataError(f"shard {masked(url)}: the server ignores range requests (sent {len(got)} bytes)")
    return got


def read_file(url: str) -> bytes:
    """A small object whole (a manifest, a sample index)."""
    fs, path = filesystem(url)
    return call(lambda: fs.cat_file(path), url, "reading it", shard=False)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(call(lambda: fs.info(path)["size"], url, "asking its size"))


def listing(url: str) -> dict[str, int | None] | None:
    """{file name: size or None} of the folder `url`, or None where the server cannot list one (plain
    http without an index page): the shards are then found when they are read. fsspec's http listing
    reads an index page's links, without sizes (fsspec/implementations/http.py, `_ls_real`)."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=True)
    except Exception:
        return None
    return {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in entries}
