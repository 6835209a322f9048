"""Shards read from where they live: HTTP (a local server on 127.0.0.1), pipe: commands, with retries.

The stream failures are injected by the server itself (a connection cut after half the bytes), so
the retry path is exercised the way a flaky object store exercises it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import webdataset as wds

from common.errors import InputError
from data_shards.reader import shard_url, tar_members, tar_samples
from tests.support import serve_flaky


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("remote") / "s-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(20):
            sink.write({"__key__": f"cell_{i:04d}", "jpg": bytes([i]) * 3000, "json": b'{"i": %d}' % i})
    return path


def test_http_shard_survives_one_broken_stream(shard):
    server, base = serve_flaky(shard.parent, failures=1)
    try:
        naps = []
        remote = list(tar_members(f"{base}/{shard.name}", retries=2, backoff_s=0.5, sleep=naps.append))
        assert remote == list(tar_members(str(shard)))  # every member once, in order
        assert naps == [0.5] and server.seen[f"/{shard.name}"] == 2
        samples = list(tar_samples([{"url": f"{base}/{shard.name}"}]))
        assert [s["__key__"] for s in samples] == [f"cell_{i:04d}" for i in range(20)]
    finally:
        server.shutdown()


def test_a_stream_that_stays_broken_is_one_error_naming_the_shard(shard):
    server, base = serve_flaky(shard.parent, failures=99)
    try:
        naps = []
        with pytest.raises(InputError, match=shard.name):
            list(tar_members(f"{base}/{shard.name}", retries=3, backoff_s=1.0, sleep=naps.append))
        assert naps == [1.0, 2.0, 4.0]  # exponential backoff, then give up
    finally:
        server.shutdown()


def test_pipe_and_manifest_urls(shard, tmp_path):
    assert list(tar_members(f"pipe:cat {shard}")) == list(tar_members(str(shard)))
    assert shard_url(tmp_path, "s/a.tar") == str(tmp_path / "s/a.tar")
    for url in (
        "https://bucket.example/s/a.tar",
        "s3://bucket/s/a.tar",
        "gs://b/a.tar",
        "pipe:cat a.tar",
        "/abs/a.tar",
    ):
        assert shard_url(tmp_path, url) == url


def test_a_shard_cut_between_two_members_is_not_read_as_complete(shard, tmp_path):
    import tarfile

    with tarfile.open(shard) as tar:
        boundary = tar.getmembers()[10].offset  # a header offset: the cut leaves only whole members
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:boundary])
    with pytest.raises(InputError, match="cut.tar"):
        list(tar_members(str(cut)))
