"""A failed request said by its HTTP status, whichever fsspec client raised it."""

import pytest

from ffscale.data import remote
from ffscale.errors import DataError, StorageError

URL = "gs://bucket/imagenet/train/train-000001.tar"


@pytest.mark.parametrize(
    "status, said, kind",
    [
        (403, "access denied (403)", DataError),
        (401, "access denied (401)", DataError),
        (404, "not found (404)", DataError),
        (416, "shorter than its manifest says", DataError),
        (503, "storage did not answer", StorageError),
    ],
)
def test_gcsfs_failures_are_said_by_their_status_and_only_the_unanswered_retried(status, said, kind):
    """gcsfs's own response check raises what a GCS answer becomes (a 403 is a plain OSError)."""
    from gcsfs.retry import validate_response

    body = b'{"error": {"code": %d, "message": "what the server said"}}' % status
    with pytest.raises(Exception) as raised:
        validate_response(status, body, "bucket/imagenet/train/train-000001.tar")
    told = remote.failure(raised.value, URL, "reading it")
    assert type(told) is kind and said in str(told) and URL in str(told)
    assert remote._transient(raised.value) == (kind is StorageError)
