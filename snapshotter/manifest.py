"""Signed root-hash manifests: what binds an image's devices to something the guest can check.

The host is not trusted. The guest opens a device only if its dm-verity root hash is the one a
manifest, signed by a key the guest trusts, gives for that position: the fsmeta, then device 1,
2, ... of the fsmeta's device table. A swapped, substituted or tampered device fails there.

- Keys: Ed25519 (default) or ECDSA P-256, PEM (PKCS#8 private key, mode 0600; SubjectPublicKey
  Info public key). A key's id is the sha256 of its DER public key.
- Manifest: canonical JSON (sorted keys, no whitespace, UTF-8) of `{"version": 1, "image": ...,
  "layers": [...], "fsmeta": ..., "flat": ...}`.
- Signature: a detached JSON envelope `{"algorithm", "key_id", "signature": base64}` over the
  canonical bytes.

Standard library plus `cryptography` only: the guest agent uses this module too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from snapshotter.errors import InvalidInput

if TYPE_CHECKING:
    from snapshotter.verity.info import VerityInfo

MANIFEST_VERSION = 1
ALGORITHMS = ("ed25519", "ecdsa-p256")


class ManifestError(InvalidInput):
    """A manifest, signature or key that must not be trusted; the message says why."""


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _algorithm(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return "ecdsa-p256"
    raise ManifestError(f"unsupported key type {type(key).__name__}")


# -- keys -------------------------------------------------------------------------------------


def generate_key(path: Path, algorithm: str = "ed25519") -> str:
    """Write a new private key to PATH (0600) and its public key to PATH.pub; return its id."""
    # Host side only; imported here because the guest ships this module without `snapshotter`.
    from snapshotter.fsutil import write_atomic

    if algorithm == "ed25519":
        key: Any = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ManifestError(f"unknown key algorithm {algorithm!r} (use {', '.join(ALGORITHMS)})")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, pem, mode=0o600)
    write_atomic(
        Path(f"{path}.pub"),
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return key_id(key.public_key())


def load_private_key(path: Path) -> Any:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{path}: not a usable private key ({exc})") from None
    _algorithm(key)
    return key


def load_public_key(data: bytes) -> Any:
    """A PEM public key (or the public half of a PEM private key)."""
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"not a usable public key ({exc})") from None
    _algorithm(key)
    return key


# -- manifests --------------------------------------------------------------------------------


def verity_entry(info: VerityInfo) -> dict[str, Any]:
    """The dm-verity facts a guest needs for one device (`VerityInfo.signed_entry`)."""
    return info.signed_entry()


def build_manifest(
    image: dict[str, Any],
    layers: list[dict[str, Any]],
    fsmeta: dict[str, Any] | None = None,
    flat: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`image`: name / manifest digest; `layers`: lowest first, each with `diff_id`,
    `digest` (the compressed blob), `erofs_digest` and `verity`; `fsmeta`/`flat`: their
    `digest` and `verity`, and for the fsmeta the device `tags` in table order."""
    manifest: dict[str, Any] = {"version": MANIFEST_VERSION, "image": image, "layers": layers}
    if fsmeta is not None:
        manifest["fsmeta"] = fsmeta
    if flat is not None:
        manifest["flat"] = flat
    return manifest


@dataclass(frozen=True)
class SignedManifest:
    manifest: dict[str, Any]
    payload: bytes  # the canonical bytes that were signed
    signature: dict[str, Any]

    def device_verity(self) -> list[dict[str, Any]]:
        """The signed dm-verity entries in device order: the fsmeta, then each layer."""
        first = [self.manifest["fsmeta"]["verity"]] if "fsmeta" in self.manifest else []
        return first + [layer["verity"] for layer in self.manifest["layers"]]

    def expected_roots(self) -> list[str]:
        """Root hashes in device order: the fsmeta, then each layer (device 1, 2, ...)."""
        return [v["root_hash"] for v in self.device_verity()]

    def digest(self) -> str:
        """What an attestation flow binds to the guest's evidence."""
        return "sha256:" + hashlib.sha256(self.payload).hexdigest()


def sign(manifest: dict[str, Any], private_key: Any) -> tuple[bytes, dict[str, Any]]:
    """(canonical payload, detached signature envelope)."""
    payload = canonical(manifest)
    algorithm = _algorithm(private_key)
    if algorithm == "ed25519":
        sig = private_key.sign(payload)
    else:
        sig = private_key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return payload, {
        "algorithm": algorithm,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(sig).decode(),
    }


def verify(payload: bytes, signature: dict[str, Any] | bytes, trusted: list[Any]) -> SignedManifest:
    """Check PAYLOAD against SIGNATURE with one of the TRUSTED public keys; ManifestError
    saying why if anything is off. Returns the parsed manifest."""
    if isinstance(signature, bytes):
        try:
            signature = json.loads(signature)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ManifestError("signature file is not JSON (truncated?)") from None
    if not isinstance(signature, dict):
        raise ManifestError("signature is not a JSON object")
    wanted = signature.get("key_id")
    keys = [k for k in trusted if key_id(k) == wanted]
    if not keys:
        raise ManifestError(f"manifest signed by an untrusted key {wanted}")
    key = keys[0]
    if signature.get("algorithm") != _algorithm(key):
        raise ManifestError("signature algorithm does not match the key")
    if not isinstance(signature.get("signature"), str):
        raise ManifestError("signature envelope has no signature")
    try:
        raw = base64.b64decode(signature["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError("signature is not base64 (truncated?)") from None
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, payload)
        else:
            key.verify(raw, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ManifestError("manifest signature does not verify") from None
    try:
        manifest = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ManifestError("signed manifest is not JSON") from None
    if canonical(manifest) != payload:
        raise ManifestError("signed manifest is not in canonical form")
    if not isinstance(manifest, dict):
        raise ManifestError("signed manifest is not a JSON object")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"unsupported manifest version {manifest.get('version')!r}")
    return SignedManifest(manifest, payload, signature)


def check_devices(signed: SignedManifest, roots: list[str]) -> None:
    """The devices about to be opened, in device order (fsmeta first), must carry exactly
    the manifest's root hashes."""
    expected = signed.expected_roots()
    if len(roots) != len(expected):
        raise ManifestError(f"{len(roots)} devices offered, the manifest names {len(expected)}")
    for i, (got, want) in enumerate(zip(roots, expected, strict=True)):
        if got != want:
            what = "fsmeta" if i == 0 and "fsmeta" in signed.manifest else f"device {i}"
            raise ManifestError(f"{what}: root hash {got} is not the signed {want}")
