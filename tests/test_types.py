from __future__ import annotations

import json

import pytest

from aiolayercache import (
    ConfigFile,
    Descriptor,
    Hash,
    IndexManifest,
    Manifest,
    ManifestError,
    MediaType,
    Platform,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def manifest_doc(**extra: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": str(MediaType.OCI_MANIFEST_SCHEMA1),
        "config": {"mediaType": str(MediaType.OCI_CONFIG_JSON), "size": 10, "digest": D1},
        "layers": [{"mediaType": str(MediaType.OCI_LAYER), "size": 20, "digest": D2}],
    }
    doc.update(extra)
    return doc


def test_manifest_parse_and_to_json_round_trip() -> None:
    raw = json.dumps(manifest_doc(annotations={"a": "b"})).encode()
    m = Manifest.parse(raw)
    assert m.schema_version == 2
    assert m.config.digest == Hash.parse(D1)
    assert m.layers[0].size == 20
    assert m.annotations == {"a": "b"}
    assert Manifest.parse(m.to_json()) == m


def test_index_parse_with_platform() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": str(MediaType.OCI_IMAGE_INDEX),
        "manifests": [
            {
                "mediaType": str(MediaType.OCI_MANIFEST_SCHEMA1),
                "size": 5,
                "digest": D1,
                "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
            }
        ],
    }
    im = IndexManifest.parse(json.dumps(doc).encode())
    p = im.manifests[0].platform
    assert p == Platform(architecture="arm64", os="linux", variant="v8")
    assert str(p) == "linux/arm64/v8"
    assert IndexManifest.parse(im.to_json()) == im


def test_platform_from_string() -> None:
    assert Platform.from_string("linux/amd64") == Platform(architecture="amd64", os="linux")
    with pytest.raises(ValueError):
        Platform.from_string("linux")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (json.dumps(manifest_doc(schemaVersion=1)).encode(), "schema 1"),
        (
            json.dumps(manifest_doc(mediaType=str(MediaType.DOCKER_MANIFEST_SCHEMA1))).encode(),
            "schema 1",
        ),
        (json.dumps(manifest_doc(manifests=[])).encode(), "ambiguous"),
        (json.dumps(manifest_doc(schemaVersion=True)).encode(), "schemaVersion"),
        (
            json.dumps(
                manifest_doc(layers=[{"mediaType": "x", "size": -1, "digest": D2}])
            ).encode(),
            "size",
        ),
        (
            json.dumps(
                manifest_doc(layers=[{"mediaType": "x", "size": "1", "digest": D2}])
            ).encode(),
            "size",
        ),
        (
            json.dumps(
                manifest_doc(layers=[{"mediaType": "x", "size": 1, "digest": "sha256:../x"}])
            ).encode(),
            "digest",
        ),
        (b"{" + b" " * (5 * 1024 * 1024) + b"}", "cap"),
    ],
)
def test_bad_manifests_raise_manifest_error(raw: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        Manifest.parse(raw)


def test_index_rejects_image_fields() -> None:
    doc = {"schemaVersion": 2, "manifests": [], "layers": []}
    with pytest.raises(ManifestError, match="ambiguous"):
        IndexManifest.parse(json.dumps(doc).encode())


def test_config_round_trip_keeps_unknown_fields() -> None:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "os.version": "10.0",
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
        "history": [{"created_by": "x", "empty_layer": True}],
        "config": {"Env": ["A=b"]},
        "docker_version": "24",
    }
    cf = ConfigFile.parse(json.dumps(doc).encode())
    assert cf.rootfs.diff_ids == [Hash.parse(D1), Hash.parse(D2)]
    assert cf.os_version == "10.0"
    assert cf.history[0].empty_layer is True
    assert cf.extra == {"docker_version": "24"}
    again = ConfigFile.parse(cf.to_json())
    assert again == cf
    assert json.loads(cf.to_json())["docker_version"] == "24"


def test_config_rejects_bad_diff_id() -> None:
    doc = {"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": ["sha256:UPPER"]}}
    with pytest.raises(ManifestError, match="diff_ids"):
        ConfigFile.parse(json.dumps(doc).encode())


def test_descriptor_data_base64() -> None:
    d = Descriptor(media_type="x", size=3, digest=Hash.of(b"abc"), data=b"abc")
    assert Descriptor.parse(d.to_json()) == d
    bad = json.loads(d.to_json())
    bad["data"] = "!!"
    with pytest.raises(ManifestError, match="base64"):
        Descriptor.parse(json.dumps(bad).encode())
