"""pytest fixtures for the resolver tests: import the ones a test module uses."""

from __future__ import annotations

import uuid

import pytest

from servers.s3_server import S3TestServer


@pytest.fixture(scope="session")
def s3_server():
    server = S3TestServer().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket (moto's state is shared by the whole session)."""
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name
    s3_server.clear_stall()


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"
