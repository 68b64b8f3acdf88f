"""A local S3-compatible server (moto's server mode, on 127.0.0.1) for the object-storage tests.

conftest's session fixture `s3` starts it once (start_s3), sets test credentials and AWS_ENDPOINT_URL in
the environment (the usual way to point S3 clients elsewhere, which Ray workers started later inherit),
and gives helpers to upload a folder and to make the server check credentials.
"""

from __future__ import annotations

import logging
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

NO_S3 = "s3fs or moto is not installed (pip install 'cnncodes[s3,test]'): object storage cannot be tested"
BUCKET = "cnncodes-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3:
    """The running server: its endpoint, and the fsspec filesystem of the test bucket."""

    endpoint: str
    fs: object

    def upload(self, folder: Path, prefix: str) -> str:
        """Copy every file under folder to s3://BUCKET/prefix/... (same relative paths); return that URL."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.fs.pipe_file(f"{BUCKET}/{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        return f"s3://{BUCKET}/{prefix}"

    @contextmanager
    def checking_credentials(self) -> Iterator[None]:
        """Requests with unknown credentials are refused (403) inside the block, as a real S3 does."""

        def reset_auth(count: str) -> None:
            # text/plain: a form body would be parsed away before moto reads the count
            request = urllib.request.Request(
                f"{self.endpoint}/moto-api/reset-auth",
                data=count.encode(),
                headers={"Content-Type": "text/plain"},
                method="POST",
            )
            urllib.request.urlopen(request, timeout=10).close()

        reset_auth("0")
        try:
            yield
        finally:
            reset_auth("inf")


def start_s3() -> Iterator[S3]:
    """The moto server, with the test bucket created, until the generator is closed (skips without moto)."""
    pytest.importorskip("s3fs", reason=NO_S3)
    server_module = pytest.importorskip("moto.server", reason=NO_S3)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(key, value)
        patch.delenv("CNNCODES_STORAGE_OPTIONS", raising=False)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield S3(endpoint, fs)
    server.stop()
