"""An OCI distribution client for `publish` and `manifest fetch`: oras-py plus what it lacks.

oras-py (`oras.provider.Registry`) supplies the requests session, token auth, blob uploads
(chunked: a layer never sits in memory whole) and streamed blob downloads. What it cannot do
(docs/publish.md says so too), done here on top of its `do_request`:
- a manifest's exact bytes: its `get_manifest` returns parsed JSON, but a digest is over the
  bytes the registry stored, so we read them raw and hash them;
- a manifest or index of our own media type and bytes: `upload_manifest` re-serialises a dict
  and always sends the image-manifest media type (the referrers tag holds an index);
- referrers: no referrers API call, and no fallback to the OCI 1.1 referrers tag schema;
- no retries with sleeps of up to 83 s on a refused connection (its `retry` decorator), and a
  timeout on every request: a registry that is down or stuck is one error line, not a hang.

Every blob and manifest read is checked against its digest before anything uses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.errors import EpError
from snapshotter.fsutil import atomic_output

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
#: The largest manifest or index we read (the distribution server's own limit is 4 MiB).
MAX_MANIFEST_BYTES = 4 << 20
REFERRERS_ATTEMPTS = 20  # read-merge-write rounds against concurrent publishers
REQUEST_TIMEOUT = 60.0  # seconds without a byte from the registry
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# host[:port]/repo[/more][:tag][@sha256:hex]; the host part is required (no Docker Hub default).
_REFERENCE = re.compile(
    r"^(?P<host>[A-Za-z0-9.-]+(?::[0-9]+)?)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


class RegistryError(EpError):
    """The registry refused, is unreachable, or served content that does not match its digest."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, when the registry answered with an error


@dataclass(frozen=True)
class Reference:
    """`host:port/repo:tag` or `host:port/repo@sha256:...` (a tag alone defaults to latest)."""

    host: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        m = _REFERENCE.match(text)
        if m is None:
            raise RegistryError(
                f"{text!r} is not an image reference (host[:port]/repo[:tag] "
                "or host[:port]/repo@sha256:<hex>)"
            )
        tag = m["tag"] or (None if m["digest"] else "latest")
        return cls(m["host"], m["repo"], tag, m["digest"])

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest when given (it pins the content)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        return text + (f"@{self.digest}" if self.digest else "")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise RegistryError(f"not a sha256 digest: {digest!r}")
    return digest


def referrers_tag(digest: str) -> str:
    """OCI 1.1's referrers tag schema: `<alg>-<hex>` of the subject's digest."""
    return check_digest(digest).replace(":", "-", 1)


def artifact_tag(subject: str, artifact: str) -> str:
    """The tag of one referrer artifact of SUBJECT: `<alg>-<hex>.<32 hex of the artifact>`."""
    return f"{referrers_tag(subject)}.{check_digest(artifact)[7:39]}"


class RegistryClient:
    """One repository on one registry."""

    def __init__(
        self, ref: Reference, plain_http: bool = False, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        import oras.container
        import oras.provider

        self.ref = ref
        self._oras = oras.provider.Registry(hostname=ref.host, insecure=plain_http)
        # oras wraps do_request in a retry loop that sleeps on any error; call it unwrapped.
        self._request_unretried = functools.partial(
            oras.provider.Registry.do_request.__wrapped__, self._oras
        )
        self._oras.session.request = functools.partial(self._oras.session.request, timeout=timeout)
        self._container = oras.container.Container(f"{ref.repository}:latest", registry=ref.host)
        self._base = f"{'http' if plain_http else 'https'}://{ref.host}/v2/{ref.repository}"

    # -- plumbing --------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any):
        import requests

        try:
            return self._request_unretried(url, method, **kwargs)
        except requests.exceptions.RequestException as exc:
            raise RegistryError(f"{self.ref.host}: {_reason(exc)}") from None
        except ValueError as exc:  # oras: an authentication it cannot answer
            raise RegistryError(f"{self.ref.host}: {exc}") from None

    def _fail(self, response, what: str):
        detail = ""
        try:
            errors = response.json().get("errors") or []
            detail = "; ".join(
                str(e.get("message", e.get("code", ""))) for e in errors if isinstance(e, dict)
            )
        except (ValueError, AttributeError):
            pass
        raise RegistryError(
            f"{self.ref.host}/{self.ref.repository}: {what}: HTTP "
            f"{response.status_code}{': ' + detail if detail else ''}",
            response.status_code,
        )

    # -- manifests -------------------------------------------------------------------------

    def get_manifest(self, target: str) -> tuple[bytes, str, str]:
        """(exact bytes, media type, digest) of the manifest or index at TARGET (tag or
        digest); a digest target must match the bytes served."""
        url = f"{self._base}/manifests/{target}"
        response = self._request(
            "GET", url, headers={"Accept": ", ".join(MANIFEST_TYPES)}, stream=True
        )
        with response:
            if response.status_code == 404:
                raise RegistryError(
                    f"{self.ref.host}/{self.ref.repository}:{target}: no such manifest"
                )
            if response.status_code != 200:
                self._fail(response, f"manifest {target}")
            data = _read_bounded(response, MAX_MANIFEST_BYTES, f"manifest {target}")
        digest = sha256_digest(data)
        if target.startswith("sha256:") and digest != target:
            raise RegistryError(
                f"manifest {target}: the registry served bytes with digest {digest}"
            )
        try:
            parsed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RegistryError(f"manifest {target} is not JSON") from None
        if not isinstance(parsed, dict):
            raise RegistryError(f"manifest {target} is not a JSON object")
        media_type = (
            parsed.get("mediaType") or response.headers.get("Content-Type", "").split(";")[0]
        )
        return data, media_type, digest

    def get_json(self, target: str, expected_type: str | None = None) -> tuple[dict, str]:
        data, media_type, digest = self.get_manifest(target)
        parsed = json.loads(data)
        if expected_type and media_type != expected_type:
            raise RegistryError(
                f"manifest {target} is a {media_type or 'thing of no type'}, not {expected_type}"
            )
        return parsed, digest

    def put_manifest(self, data: bytes, media_type: str, target: str | None = None) -> str:
        """Store DATA as a manifest (by its digest, or under tag TARGET); its digest."""
        digest = sha256_digest(data)
        url = f"{self._base}/manifests/{target or digest}"
        response = self._request("PUT", url, data=data, headers={"Content-Type": media_type})
        if response.status_code not in (200, 201):
            self._fail(response, f"push manifest {target or digest}")
        served = response.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise RegistryError(f"pushed manifest {digest}, the registry stored {served}")
        return digest

    # -- blobs -----------------------------------------------------------------------------

    def get_blob(self, digest: str, out: Path, max_size: int | None = None) -> int:
        """Download blob DIGEST to OUT (atomically), checking its digest; its size."""
        check_digest(digest)
        response = self._request("GET", f"{self._base}/blobs/{digest}", stream=True)
        with response:
            if response.status_code != 200:
                self._fail(response, f"blob {digest}")
            hasher = hashlib.sha256()
            size = 0
            with atomic_output(out) as f:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    size += len(chunk)
                    if max_size is not None and size > max_size:
                        raise RegistryError(
                            f"blob {digest} is larger than its declared {max_size} bytes"
                        )
                    hasher.update(chunk)
                    f.write(chunk)
                got = "sha256:" + hasher.hexdigest()
                if got != digest:
                    raise RegistryError(
                        f"blob {digest}: the registry served bytes with "
                        f"digest {got} (altered in its storage?)"
                    )
        return size

    def get_small_blob(self, digest: str, max_size: int) -> bytes:
        with tempfile.TemporaryDirectory(prefix="ep-blob-") as tmp:
            path = Path(tmp) / "blob"
            self.get_blob(digest, path, max_size)
            return path.read_bytes()

    def put_blob(self, path: Path, digest: str | None = None) -> dict[str, Any]:
        """Upload the file at PATH (chunked, never whole in memory); its descriptor fields."""
        if digest is None:
            hasher = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
            digest = "sha256:" + hasher.hexdigest()
        size = path.stat().st_size
        layer = {"digest": digest, "size": size}
        import requests

        try:
            response = self._oras.upload_blob(str(path), self._container, layer, do_chunked=True)
        except requests.exceptions.RequestException as exc:
            raise RegistryError(f"{self.ref.host}: {_reason(exc)}") from None
        except ValueError as exc:
            raise RegistryError(f"{self.ref.host}: push blob {digest}: {exc}") from None
        if response.status_code not in (200, 201, 202):
            self._fail(response, f"push blob {digest}")
        return {"digest": digest, "size": size}

    def put_bytes(self, data: bytes) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="ep-blob-") as tmp:
            path = Path(tmp) / "blob"
            path.write_bytes(data)
            return self.put_blob(path, sha256_digest(data))

    # -- referrers -------------------------------------------------------------------------

    def referrers(self, subject: str) -> tuple[list[dict[str, Any]], bool]:
        """Descriptors of the manifests whose subject is SUBJECT, and whether the registry's
        referrers API answered (False: read from the referrers tag, OCI 1.1's fallback)."""
        response = self._request(
            "GET",
            f"{self._base}/referrers/{check_digest(subject)}",
            headers={"Accept": OCI_INDEX},
            stream=True,
        )
        with response:
            if response.status_code == 200 and response.headers.get("Content-Type", "").startswith(
                OCI_INDEX
            ):
                data = _read_bounded(response, MAX_MANIFEST_BYTES, "referrers")
                try:
                    index = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise RegistryError(f"referrers of {subject}: not JSON") from None
                return _descriptors(index), True
            if response.status_code not in (404, 405, 400):
                self._fail(response, f"referrers of {subject}")
        index = self._referrers_index(subject)
        found = {d["digest"]: d for d in (_descriptors(index) if index else [])}
        prefix = referrers_tag(subject) + "."
        for tag in self.tags():
            if not tag.startswith(prefix):
                continue
            try:
                data, media_type, digest = self.get_manifest(tag)
            except RegistryError as exc:
                if exc.status == 404 or "no such manifest" in str(exc):
                    continue  # deleted since the listing
                raise
            body = json.loads(data)
            if digest in found or (body.get("subject") or {}).get("digest") != subject:
                continue
            found[digest] = {
                "mediaType": media_type,
                "digest": digest,
                "size": len(data),
                "artifactType": body.get("artifactType"),
                "annotations": body.get("annotations") or {},
            }
        return list(found.values()), False

    def tags(self) -> list[str]:
        """Every tag of the repository (following the `Link` pagination)."""
        url: str | None = f"{self._base}/tags/list?n=1000"
        tags: list[str] = []
        while url is not None:
            response = self._request("GET", url)
            if response.status_code == 404:
                return tags
            if response.status_code != 200:
                self._fail(response, "tags")
            try:
                page = response.json().get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError(f"{self.ref.host}: tag list is not JSON") from None
            tags += [t for t in page if isinstance(t, str)]
            link = response.links.get("next", {}).get("url")
            url = (
                None
                if not link
                else (link if link.startswith("http") else self._base.split("/v2/")[0] + link)
            )
        return tags

    def _referrers_index(self, subject: str) -> dict | None:
        try:
            index, _ = self.get_json(referrers_tag(subject), OCI_INDEX)
        except RegistryError as exc:
            if "no such manifest" in str(exc):
                return None
            raise
        return index

    def push_referrer(
        self, subject: str, artifact: bytes, media_type: str, descriptor: dict[str, Any]
    ) -> str | None:
        """Push ARTIFACT (a manifest whose `subject` is SUBJECT) so that it is found as a
        referrer of SUBJECT. With a referrers API, pushing it is all. Without one:
        1. it is also tagged `<alg>-<hex>.<first 32 hex of its digest>`: one tag per artifact,
           written once, so concurrent publishers never lose each other's (`referrers` reads
           these tags too);
        2. DESCRIPTOR is added to the referrers tag's index (OCI 1.1 distribution spec,
           "pushing manifests with subject") for other OCI 1.1 clients. That is a
           read-modify-write the API offers no compare-and-swap for: writers at the same moment
           can still drop each other's entries there (not from step 1).
        Returns the referrers index digest, or None when the API serves referrers."""
        digest = self.put_manifest(artifact, media_type)
        response = self._request(
            "GET", f"{self._base}/referrers/{check_digest(subject)}", headers={"Accept": OCI_INDEX}
        )
        if response.status_code == 200 and response.headers.get("Content-Type", "").startswith(
            OCI_INDEX
        ):
            return None
        self.put_manifest(artifact, media_type, artifact_tag(subject, digest))
        rng = random.Random(descriptor["digest"])  # jitter: writers in step fall out of it
        for _attempt in range(REFERRERS_ATTEMPTS):
            try:
                index = self._referrers_index(subject) or {
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": [],
                }
                manifests = [
                    d for d in _descriptors(index) if d.get("digest") != descriptor["digest"]
                ]
                index["manifests"] = [*manifests, descriptor]
                data = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
                digest = self.put_manifest(data, OCI_INDEX, referrers_tag(subject))
                # No conditional PUT in the distribution API: read back, and merge again if
                # a concurrent publisher's write replaced ours.
                after = self._referrers_index(subject)
            except RegistryError as exc:
                # distribution's filesystem storage answers 500 to a read of a tag being
                # rewritten at that moment: transient, try again
                if exc.status is None or exc.status < 500:
                    raise
            else:
                if after and descriptor["digest"] in {d["digest"] for d in _descriptors(after)}:
                    return digest
            time.sleep(rng.uniform(0.02, 0.2))
        raise RegistryError(
            f"referrers tag of {subject}: kept being replaced by concurrent writers; publish again"
        )


def _descriptors(index: Any) -> list[dict[str, Any]]:
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise RegistryError("referrers index is not an OCI index")
    return [
        d
        for d in index["manifests"]
        if isinstance(d, dict) and isinstance(d.get("digest"), str) and _DIGEST.match(d["digest"])
    ]


def _read_bounded(response, limit: int, what: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_content(chunk_size=1 << 16):
        data += chunk
        if len(data) > limit:
            raise RegistryError(f"{what}: more than {limit} bytes")
    return bytes(data)


def _reason(exc: Exception) -> str:
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError):
        return "cannot connect (is the registry running? plain HTTP needs --plain-http)"
    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {REQUEST_TIMEOUT:.0f} s"
    return type(exc).__name__
