"""ImageNet weight files are checked against their full sha256 where it is known (small fake files)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wpcrack.errors import WpcrackError
from wpcrack.models import weights_cache
from wpcrack.models.weights_cache import KNOWN_SHA256, cache_weights, verify_weights

SHARED_MOBILENET = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


def test_corrupt_copy_of_a_known_file_is_refused_naming_the_file(tmp_path, capsys):
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(b"not the torchvision weights")
    with pytest.raises(WpcrackError, match=r"mobilenet_v2-b0353104\.pth: sha256 .* differs from the known") as err:
        verify_weights(fake)
    assert str(fake) in str(err.value) and "\n" not in str(err.value)

    dest = tmp_path / "hub"
    with pytest.raises(WpcrackError, match="differs from the known"):
        cache_weights([fake], dest)
    assert not dest.exists()  # nothing cached
    assert weights_cache.main([str(fake)]) == 1
    assert f"error: {fake}: sha256" in capsys.readouterr().err


def test_full_digest_is_checked_beyond_the_name_prefix(tmp_path, monkeypatch):
    data = b"small fake weights"
    digest = hashlib.sha256(data).hexdigest()
    name = f"net-{digest[:8]}.pth"  # the hash prefix in the name matches ...
    fake = tmp_path / name
    fake.write_bytes(data)
    monkeypatch.setitem(KNOWN_SHA256, name, digest[:8] + "0" * 56)  # ... the full digest does not
    with pytest.raises(WpcrackError, match=rf"{name}: sha256 {digest[:12]}\.\.\. differs from the known {name}"):
        verify_weights(fake)

    monkeypatch.setitem(KNOWN_SHA256, name, digest)
    assert verify_weights(fake) == digest
    assert cache_weights([fake], tmp_path / "hub") == [tmp_path / "hub" / name]


def test_unknown_files_keep_the_prefix_check(tmp_path):
    ok = tmp_path / "plain.pth"  # no prefix, no known digest: accepted
    ok.write_bytes(b"x")
    assert verify_weights(ok) == hashlib.sha256(b"x").hexdigest()
    bad = tmp_path / "resnet18-f37072fd.pth"
    bad.write_bytes(b"x")
    with pytest.raises(WpcrackError, match=r"resnet18-f37072fd\.pth: sha256 .* does not start with f37072fd"):
        verify_weights(bad)


@pytest.mark.skipif(not SHARED_MOBILENET.is_file(), reason="../shared/weights not present")
def test_shared_mobilenet_file_matches_its_known_digest():
    assert verify_weights(SHARED_MOBILENET) == KNOWN_SHA256[SHARED_MOBILENET.name]
