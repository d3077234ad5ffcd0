"""Media types of the OCI / Docker v2 image model, and the one home of each rule on them."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["MediaType", "is_image_type", "is_index_type", "is_schema1_type"]


class MediaType(StrEnum):
    """OCI and Docker v2 media types (the names follow go-containerregistry's ``types``).

    The rules on them are the functions of this module (:func:`is_index_type`,
    ...), which take any string: descriptors carry media types as plain text.
    """

    OCI_CONTENT_DESCRIPTOR = "application/vnd.oci.descriptor.v1+json"
    OCI_IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_MANIFEST_SCHEMA1 = "application/vnd.oci.image.manifest.v1+json"
    OCI_CONFIG_JSON = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_UNCOMPRESSED_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_RESTRICTED_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    OCI_UNCOMPRESSED_RESTRICTED_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
    OCI_EMPTY_JSON = "application/vnd.oci.empty.v1+json"

    DOCKER_MANIFEST_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
    DOCKER_MANIFEST_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    DOCKER_MANIFEST_SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    DOCKER_CONFIG_JSON = "application/vnd.docker.container.image.v1+json"
    DOCKER_PLUGIN_CONFIG = "application/vnd.docker.plugin.v1+json"
    DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    DOCKER_UNCOMPRESSED_LAYER = "application/vnd.docker.image.rootfs.diff.tar"


def is_index_type(media_type: str | None) -> bool:
    """True for an index media type (OCI image index, Docker manifest list)."""
    return media_type in (MediaType.OCI_IMAGE_INDEX, MediaType.DOCKER_MANIFEST_LIST)


def is_image_type(media_type: str | None) -> bool:
    """True for an image manifest media type (OCI image manifest, Docker schema 2)."""
    return media_type in (MediaType.OCI_MANIFEST_SCHEMA1, MediaType.DOCKER_MANIFEST_SCHEMA2)


def is_schema1_type(media_type: str | None) -> bool:
    """True for a Docker schema 1 manifest media type (signed or not), which is not supported."""
    return media_type in (
        MediaType.DOCKER_MANIFEST_SCHEMA1,
        MediaType.DOCKER_MANIFEST_SCHEMA1_SIGNED,
    )
