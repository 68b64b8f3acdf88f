"""Where datasets live: a local folder, or an object-store URL (s3://, gs://, az://) read through fsspec.

A URL keeps its protocol everywhere (image paths, the cache's dataset_root, head folders, reports).
Credentials and the endpoint come from the protocol's usual environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) or from fsspec options: the JSON object given with
--storage-options, else the one in $CNNCODES_STORAGE_OPTIONS. Option values are never printed.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

from .errors import UserError

STORAGE_OPTIONS_ENV = "CNNCODES_STORAGE_OPTIONS"
# (package, what to pip install) for each protocol's fsspec implementation; the project's extra where it has one
PROTOCOL_INSTALL = {
    "s3": ("s3fs", "cnncodes[s3]"),
    "s3a": ("s3fs", "cnncodes[s3]"),
    "gs": ("gcsfs", "gcsfs"),
    "gcs": ("gcsfs", "gcsfs"),
    "az": ("adlfs", "adlfs"),
    "abfs": ("adlfs", "adlfs"),
    "abfss": ("adlfs", "adlfs"),
}
# objects fetched at once: an object store answers each request after a round trip, not a disk seek
FETCH_BATCH = 64
IO_THREADS = 16  # threads that wait on object reads (they hold no core while they wait)

Location = str | os.PathLike


def is_url(path: Location) -> bool:
    """True for an object-store URL (a protocol other than file://)."""
    text = os.fspath(path)
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def local_path(path: Location) -> Path:
    """A local path (a file:// URL loses its protocol), user-expanded."""
    text = os.fspath(path)
    return Path(text.removeprefix("file://")).expanduser()


def storage_options(given: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options: given (a dict, JSON text, or @FILE holding JSON), else the JSON (or @FILE) in
    $CNNCODES_STORAGE_OPTIONS, else none. A file keeps secrets off the command line and out of `ps`."""
    if isinstance(given, Mapping):
        return dict(given)
    where = "--storage-options" if given is not None else f"${STORAGE_OPTIONS_ENV}"
    text = given if given is not None else os.environ.get(STORAGE_OPTIONS_ENV, "")
    if text.startswith("@"):
        where = f"{where} file {text[1:]}"
        try:
            text = Path(text[1:]).expanduser().read_text()
        except OSError as exc:
            raise UserError(f"{where} cannot be read ({exc.strerror}); give a readable JSON file.") from None
    if not text.strip():
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:  # the position only: the text may hold a secret
        raise UserError(
            f"{where} is not valid JSON (at character {exc.pos}); give a JSON object such as "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\'.'
        ) from None
    if not isinstance(options, dict):
        raise UserError(f"{where} must be a JSON object of fsspec options, not a {type(options).__name__}.")
    return options


def protocol(url: str) -> str:
    """The URL's protocol: 's3' for s3://bucket/key."""
    return url.split("://", 1)[0].lower()


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for an object-store URL; UserError when it cannot be used."""
    scheme = protocol(url)
    try:
        import fsspec.core

        return fsspec.core.url_to_fs(url, **storage_options(options))
    except ImportError:
        package, install = PROTOCOL_INSTALL.get(scheme, (f"the fsspec package for {scheme}://", scheme))
        raise UserError(
            f"{url}: reading {scheme}:// needs {package}, which is not installed: pip install '{install}'."
        ) from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise UserError(
                f"{url}: unknown storage protocol {scheme}://; use a local path or s3://, gs://, "
                "az:// (see docs/scale-out.md)."
            ) from None
        raise UserError(f"{url}: not a usable URL ({exc}).") from None
    except TypeError as exc:  # an option the filesystem's constructor does not take
        raise UserError(
            f"{url}: the storage options are not accepted by {scheme}:// ({exc}); see "
            f"--storage-options and ${STORAGE_OPTIONS_ENV}."
        ) from None


def access_error(url: str, exc: BaseException) -> UserError:
    """The one-line message for an object store that refused or failed a listing or a read."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return UserError(
            f"{url} does not exist (no such bucket, or nothing under that prefix); check the URL and, "
            "for another S3 endpoint, AWS_ENDPOINT_URL or the storage option endpoint_url."
        )
    if isinstance(exc, PermissionError):
        return UserError(
            f"{url}: access denied ({exc.__class__.__name__}); check the credentials (for s3://: "
            f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or --storage-options, "
            f"${STORAGE_OPTIONS_ENV})."
        )
    reason = str(exc).splitlines()[0][:200] if str(exc) else ""
    return UserError(
        f"{url}: the object store could not be read ({type(exc).__name__}: {reason}); check the URL, "
        "the endpoint (AWS_ENDPOINT_URL or storage option endpoint_url) and the network."
    )


def open_binary(path: Location, options: Mapping[str, Any] | None = None) -> IO[bytes]:
    """A file or an object, opened for reading bytes."""
    if is_url(path):
        fs, inner = filesystem(os.fspath(path), options)
        return fs.open(inner, "rb")
    return open(local_path(path), "rb")


def read_bytes(path: Location, options: Mapping[str, Any] | None = None) -> bytes:
    """All the bytes of a file or an object."""
    if is_url(path):
        fs, inner = filesystem(os.fspath(path), options)
        return fs.cat_file(inner)
    return local_path(path).read_bytes()


def read_many(
    paths: Sequence[Location], options: Mapping[str, Any] | None = None, threads: int = 1
) -> Iterator[bytes | OSError]:
    """The bytes of each path, in order (an OSError in place of one that cannot be read).

    Objects are fetched FETCH_BATCH at a time concurrently (one round trip each, overlapped); local files
    are read on `threads` threads.
    """

    def one(path: Location) -> bytes | OSError:
        try:
            return read_bytes(path, options)
        except OSError as exc:
            return exc

    remote = [os.fspath(p) for p in paths if is_url(p)]
    if not remote:
        if threads <= 1:
            yield from map(one, paths)
        else:
            with ThreadPoolExecutor(threads) as pool:
                yield from pool.map(one, paths)
        return
    fs, _ = filesystem(remote[0], options)
    for start in range(0, len(paths), FETCH_BATCH):
        batch = [os.fspath(p) for p in paths[start : start + FETCH_BATCH]]
        if not all(is_url(p) for p in batch):
            yield from map(one, batch)
            continue
        fetched = fs.cat([fs._strip_protocol(p) for p in batch], on_error="return")
        for p in batch:
            data = fetched.get(fs._strip_protocol(p))
            yield data if isinstance(data, bytes) else _as_os_error(data, p)


def _as_os_error(exc: Any, path: str) -> OSError:
    """What a batched fetch returned in place of an object's bytes, as the OSError a single read raises."""
    if isinstance(exc, OSError):
        return exc
    return OSError(f"{path}: {type(exc).__name__}: {exc}" if exc is not None else f"{path}: not returned")


def list_tree(url: str, options: Mapping[str, Any] | None = None) -> tuple[str, list[str], set[str]]:
    """(the URL of root, the relative paths of every object under it, the folders they imply) in one listing.

    Object stores have no folders: a key a/b/c.jpg implies the folders a and a/b.
    """
    fs, root = filesystem(url, options)
    root = root.rstrip("/")
    try:
        found = fs.find(root, withdirs=True, detail=True)
        if not found and fs.isfile(root):
            raise UserError(
                f"{url} is an object, not a folder; expected DATA_DIR/CLASS/*.jpg (one sub-folder per class)."
            )
    except Exception as exc:  # noqa: BLE001 (the first request: any failure of the store is the user's to fix)
        raise access_error(url, exc) from None
    files, dirs = [], set()
    prefix = root + "/"
    for name, info in found.items():
        name = name.rstrip("/")
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        if info.get("type") == "directory":
            dirs.add(rel)
        else:
            files.append(rel)
            parts = rel.split("/")[:-1]
            dirs.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    return fs.unstrip_protocol(root), files, dirs
