"""An API fuzz of the OpenAPI schema that the server publishes (schemathesis, in-process over ASGI, all checks):
no 500, no status the schema does not document, no schema-valid request refused, no invalid one accepted."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'cnncodes[web]'")
schemathesis = pytest.importorskip(
    "schemathesis", reason="the test extra is not installed: pip install 'cnncodes[test]'"
)
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402
from test_serve import FakeClassifier  # noqa: E402

from pipeline.images import ImageError, decode_image  # noqa: E402
from pipeline.web.api import LOOPBACK_NAMES, ServeLimits, create_app  # noqa: E402

HOST = "testserver"  # the Host header of schemathesis' ASGI client
APP = create_app(
    FakeClassifier(), ServeLimits(max_upload_mb=0.05, max_request_mb=0.5, allowed_hosts=(*LOOPBACK_NAMES, HOST))
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def png(seed: int) -> bytes:
    """A small PNG of random pixels and size."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


# The schema can say each file is binary (application/octet-stream), not that it is an image: the files of a
# generated request are real images, so that a schema-valid request must be answered 200.
schemathesis.openapi.media_type("application/octet-stream", st.integers(0, 2**32 - 1).map(png))


def is_image(data: object) -> bool:
    try:
        decode_image(data.encode() if isinstance(data, str) else data, 8)
        return True
    except (ImageError, TypeError):
        return False


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_fuzz(case) -> None:
    """Every built-in check but one; that one (schema-valid data accepted) is replaced by a stricter reading: a
    schema-valid request is answered 2xx unless one of its files is not an image (the documented 422)."""
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if positive and case.operation.path == "/predict":
        files = case.body.get("files", []) if isinstance(case.body, dict) else []
        if files and all(is_image(f) for f in files):
            assert response.status_code == 200, (response.status_code, response.text[:300])
        else:
            error = response.json().get("error", "")
            assert response.status_code == 422 and ("not an image" in error or "empty file" in error), error
    elif positive:
        assert response.status_code == 200, (case.operation.path, response.status_code, response.text[:300])
