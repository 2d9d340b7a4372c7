"""The cluster's PKI: its CA, node and client certificates, and TLS contexts.

Owns: creating the cluster CA at ``shoal init``, signing certificate requests, reading
the identity a certificate carries, the CA digest that join tokens pin, the TLS
contexts of the node-to-node API (server and client side), and the node's TLS files in
``DATA_DIR/tls/``. Must not touch: the network, the store, or who may get a certificate
(the agent decides; this module only signs what it is told to).

Certificates (ECDSA P-256, SHA-256) carry who they belong to in the subject, as
Docker Swarm's do::

    O  = cluster id      OU = manager | worker | client      CN = node id (or client name)
    SAN: DNS:<role>.shoal, DNS:<node id>.node.shoal

A peer checks the *role* of a server by asking TLS to verify the name ``<role>.shoal``
(``server_hostname``), so a worker can never pass for a manager; a server reads the
client's node id and role from the verified certificate and checks them against the
current membership (that is how a removed node's certificate stops working).

The node's files: ``tls/ca.pem`` (the roots it trusts: the cluster CA certificate, and
during a CA rotation the new root after it) and ``tls/node.pem`` (its own certificate, during
a rotation followed by the new root cross-signed by the old one, then its private key, 0600;
the key never leaves the node). On an autolocked manager the key is PKCS#8-encrypted with a
random password kept wrapped under the unlock key (``TlsFiles.password``;
shoal.node.keys).

CA rotation (``cross_sign``): a new root gets its own name (``shoal cluster CA <serial>``);
roots allow one intermediate below them (path length 1; 0 before CA rotation existed), so
the old root can cross-sign the new one; shoal.node.keys runs the
phases (every node trusts both roots → certificates re-issued under the new one → the old
root dropped).

Errors::

    PkiError            a certificate, key or request is malformed or does not verify
                        (node/errors.py)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shoal.node.errors import PkiError

if TYPE_CHECKING:  # cryptography.x509 (~1.9 MiB) is imported where a certificate is made or
    from cryptography import x509  # parsed; an agent reads its own through ssl (own_info)

ROLE_MANAGER = "manager"
ROLE_WORKER = "worker"
ROLE_CLIENT = "client"
ROLES = (ROLE_MANAGER, ROLE_WORKER, ROLE_CLIENT)
# Certificates are valid from an hour before they are signed (swarmkit's CertBackdate): a
# node whose clock runs ahead of the others by up to that much issues certificates they
# accept at once (with 60 s, a manager 10 minutes ahead issued certificates that joining
# nodes could not use: tests/test_faults_clock.py).
CLOCK_SKEW = 3600.0
CA_LIFETIME = 20 * 365 * 86400.0  # seconds; replaced by `shoal ca rotate`
DEFAULT_CERT_LIFETIME = 90 * 86400.0  # seconds
MAX_CSR_BYTES = 16 * 1024


def role_hostname(role: str) -> str:
    """The DNS name in every certificate of ``role``: TLS checks it to verify a peer's role."""
    return f"{role}.shoal"


def node_hostname(node_id: str) -> str:
    return f"{node_id}.node.shoal"


# --------------------------------------------------------------------------------- keys

def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"malformed private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("private key is not an EC key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate request for ``key``. Its subject is ignored: the CA decides names."""
    from cryptography import x509  # (where a certificate is made: see the imports above)
    from cryptography.x509.oid import NameOID
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal-node")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_public_key(csr_pem: bytes | str) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate request whose signature verifies (so
    its sender holds the key): a joining node's stable identity (shoal.node.joining)."""
    from cryptography import x509  # (where a certificate is made: see the imports above)
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise PkiError("certificate request too large")
    try:
        csr = x509.load_pem_x509_csr(data)
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature) as exc:
        raise PkiError(f"malformed certificate request: {exc}") from exc
    if not valid:
        raise PkiError("certificate request signature does not verify")
    return _spki(csr.public_key())


# --------------------------------------------------------------------------------- certificates

def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


def _load_cert(pem: bytes | str) -> x509.Certificate:
    from cryptography import x509  # (where a certificate is parsed: see the imports above)
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"malformed certificate: {exc}") from exc


def load_certs(pem: bytes | str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in order (a trust bundle, a chain)."""
    from cryptography import x509  # (where a certificate is parsed: see the imports above)
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"malformed certificate bundle: {exc}") from exc
    return certs


def bundle(*pems: bytes | str) -> bytes:
    """Concatenate PEM certificates (empty ones skipped) into one trust bundle."""
    out = b""
    for pem in pems:
        data = pem.encode() if isinstance(pem, str) else pem
        if data.strip():
            out += data.strip() + b"\n"
    return out


def ca_digest(ca_pem: bytes | str) -> str:
    """SHA-256 of the CA certificate (DER), hex: the digest join tokens carry."""
    cert = _load_cert(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _ts(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


@dataclass(frozen=True)
class CertInfo:
    """Who a certificate belongs to and when it is valid (Unix seconds)."""

    subject_id: str  # node id, or the name of a client certificate
    role: str  # manager | worker | client
    cluster_id: str
    serial: int
    not_before: float
    not_after: float

    @property
    def issued_at(self) -> float:
        return self.not_before + CLOCK_SKEW

    @property
    def lifetime(self) -> float:
        return self.not_after - self.issued_at


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    attrs = name.get_attributes_for_oid(oid)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode()


def cert_info(pem: bytes | str) -> CertInfo:
    from cryptography.x509.oid import NameOID  # (where a certificate is parsed: see above)
    cert = _load_cert(pem)
    return CertInfo(
        subject_id=_name_attr(cert.subject, NameOID.COMMON_NAME),
        role=_name_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        cluster_id=_name_attr(cert.subject, NameOID.ORGANIZATION_NAME),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def peer_info(peercert: dict[str, Any] | None) -> CertInfo | None:
    """The identity in a certificate TLS already verified (``SSLObject.getpeercert()``)."""
    if not peercert:
        return None
    subject = peercert.get("subject", ())
    try:  # (parsed once per certificate: every mTLS request asks, heartbeats 50 a second)
        return _peer_info(subject, peercert.get("serialNumber", "0"),
                          peercert["notBefore"], peercert["notAfter"])
    except (KeyError, TypeError):  # (TypeError: an unhashable subject)
        return None


@functools.lru_cache(maxsize=1024)
def _peer_info(subject: tuple[Any, ...], serial: str, not_before: str, not_after: str
               ) -> CertInfo | None:
    fields: dict[str, str] = {}
    for rdn in subject:
        for key, value in rdn:
            fields.setdefault(key, value)
    try:
        return CertInfo(
            subject_id=fields.get("commonName", ""),
            role=fields.get("organizationalUnitName", ""),
            cluster_id=fields.get("organizationName", ""),
            serial=int(serial, 16),
            not_before=ssl.cert_time_to_seconds(not_before),
            not_after=ssl.cert_time_to_seconds(not_after),
        )
    except ValueError:
        return None


def own_info(server: ssl.SSLContext, ca_pem: bytes | str) -> CertInfo | None:
    """The identity in the certificate ``server`` presents, read the way a peer reads it
    (``peer_info``): a TLS handshake in memory with a client that trusts ``ca_pem``. So a
    running agent never needs cryptography.x509 for its own certificate. None if that client
    refuses it (expired, another CA): then parse the file (``TlsFiles.info``)."""
    client = client_context(ca_pem)
    client.check_hostname = False  # (only the certificate's fields are read)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    with contextlib.suppress(ssl.SSLError):  # (refused: a handshake failure)
        for _ in range(4):  # (TLS 1.3: two flights; 1.2: three)
            with contextlib.suppress(ssl.SSLWantReadError):
                c.do_handshake()
                return peer_info(c.getpeercert())
            s_in.write(c_out.read())
            with contextlib.suppress(ssl.SSLWantReadError):
                s.do_handshake()
            c_in.write(s_out.read())
    return None


def create_ca(cluster_id: str, now: float, lifetime: float = CA_LIFETIME,
              rotated: bool = False) -> tuple[bytes, bytes]:
    """A new self-signed cluster CA: ``(certificate PEM, private key PEM)``. ``rotated``: a
    replacement root (its own name, so chains never confuse it with the old one)."""
    from cryptography import x509  # (where a certificate is made: see the imports above)
    from cryptography.x509.oid import NameOID
    key = new_key()
    serial = x509.random_serial_number()
    cn = f"shoal cluster CA {serial:x}"[:64] if rotated else "shoal cluster CA"
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(_ts(now - CLOCK_SKEW))
            .not_valid_after(_ts(now + lifetime))
            # path length 1: room for one intermediate, the cross-signed next root
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


class CertificateAuthority:
    """The cluster CA with its private key: signs node and client certificates."""

    def __init__(self, cert_pem: bytes | str, key_pem_: bytes) -> None:
        self.cert = _load_cert(cert_pem)
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self._key = load_key(key_pem_)
        if _spki(self._key.public_key()) != _spki(self.cert.public_key()):
            raise PkiError("the CA key does not belong to the CA certificate")

    @property
    def digest(self) -> str:
        return ca_digest(self.cert_pem)

    def cross_sign(self, new_root_pem: bytes | str, now: float) -> bytes:
        """``new_root_pem``'s name and key signed by this (old) root: an intermediate that
        lets a peer still trusting only the old root verify a new-root certificate."""
        from cryptography import x509  # (where a certificate is made: see the imports above)
        new = _load_cert(new_root_pem)
        cert = (x509.CertificateBuilder()
                .subject_name(new.subject).issuer_name(self.cert.subject)
                .public_key(new.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_ts(now - CLOCK_SKEW))
                .not_valid_after(min(new.not_valid_after_utc, self.cert.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(new.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
                .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, csr_pem: bytes | str, subject_id: str, role: str, cluster_id: str,
              now: float, lifetime: float, addr: str = "") -> bytes:
        """Sign ``csr_pem`` for ``subject_id`` in ``role``; the CSR's own subject is ignored."""
        from cryptography import x509  # (where a certificate is made: see the imports above)
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        if role not in ROLES:
            raise PkiError(f"unknown role {role!r}")
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if len(data) > MAX_CSR_BYTES:
            raise PkiError("certificate request too large")
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise PkiError(f"malformed certificate request: {exc}") from exc
        try:
            valid = csr.is_signature_valid
        except (ValueError, InvalidSignature):
            valid = False
        if not valid:
            raise PkiError("certificate request signature does not verify")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or \
                not isinstance(pub.curve, ec.SECP256R1):
            raise PkiError("certificate request must use an ECDSA P-256 key")
        not_after = min(now + lifetime, self.cert.not_valid_after_utc.timestamp())
        names: list[x509.GeneralName] = [x509.DNSName(role_hostname(role))]
        if role != ROLE_CLIENT:
            names.append(x509.DNSName(node_hostname(subject_id)))
        if addr:
            with contextlib.suppress(ValueError):  # not an IP: no IP name
                names.append(x509.IPAddress(ipaddress.ip_address(addr)))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role != ROLE_CLIENT:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, subject_id)]))
                .issuer_name(self.cert.subject)
                .public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(_ts(now - CLOCK_SKEW))
                .not_valid_after(_ts(not_after))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_encipherment=False, key_cert_sign=False,
                    crl_sign=False, content_commitment=False, data_encipherment=False,
                    key_agreement=True, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()), critical=False)
                .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)


def verify_issued_by(cert_pem: bytes | str, ca_pem: bytes | str) -> None:
    """PkiError unless the (first) certificate of ``cert_pem`` was signed by a root of
    ``ca_pem``."""
    cert = _load_cert(cert_pem)
    why = "no root given"
    for ca in load_certs(ca_pem):
        try:
            cert.verify_directly_issued_by(ca)
            return
        except (ValueError, TypeError, InvalidSignature) as exc:
            why = str(exc) or type(exc).__name__
    raise PkiError(f"certificate is not signed by the cluster CA: {why}")


def verify_issued(cert_pem: bytes | str, ca_pem: bytes | str, key: ec.EllipticCurvePrivateKey
                  ) -> CertInfo:
    """Check that ``cert_pem`` was signed by a root of ``ca_pem`` (a bundle during a CA
    rotation) and is for ``key``; return its identity."""
    verify_issued_by(cert_pem, ca_pem)
    cert = _load_cert(cert_pem)
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise PkiError("certificate is not for this node's key")
    return cert_info(cert_pem)


# --------------------------------------------------------------------------------- TLS contexts

def _base(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(ca_pem: bytes | str, cert_file: Path, require_client_cert: bool,
                   password: bytes | None = None) -> ssl.SSLContext:
    """Server side of the node API: our certificate; client certificates verified against the
    cluster CA (required, or optional for the routes a joining node calls before it has one).
    ``password``: of an encrypted key (autolock)."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(cert_file), password=password)
    ctx.load_verify_locations(cadata=_text(ca_pem))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_pem: bytes | str, cert_file: Path | None = None,
                   key_file: Path | None = None, password: bytes | None = None
                   ) -> ssl.SSLContext:
    """Client side: trusts only the cluster CA and checks the server name (callers pass a
    role or node name as ``server_hostname``); presents our certificate when given."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cadata=_text(ca_pem))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None:  # key_file None: cert_file holds the key too
        ctx.load_cert_chain(str(cert_file), None if key_file is None else str(key_file),
                            password=password)
    return ctx


def unverified_client_context() -> ssl.SSLContext:
    """Only to fetch the (public) CA certificate before a join; the caller must compare its
    digest with the token's before trusting anything it says."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _text(pem: bytes | str) -> str:
    return pem.decode() if isinstance(pem, bytes) else pem


# --------------------------------------------------------------------------------- files

def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically with ``mode`` from the start (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass
class TlsFiles:
    """A node's TLS material on disk: ``DATA_DIR/tls/ca.pem`` and ``node.pem`` (its
    certificate followed by its private key, 0600). One file for both, so a renewal replaces
    them with one atomic rename: never a certificate that does not match the key."""

    dir: Path
    # the password of the key in node.pem (an autolocked manager); None = in the clear
    password: bytes | None = None
    # ca.pem writes through this object so far (a reader that remembers what it saw can
    # skip re-reading the file until this moves)
    ca_writes: int = 0

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert(self) -> Path:
        """Certificate and key (``ssl.SSLContext.load_cert_chain(cert)`` reads both)."""
        return self.dir / "node.pem"

    def exists(self) -> bool:
        return self.ca.exists() and self.cert.exists()

    def save(self, ca_pem: bytes, cert_pem: bytes, key_pem_: bytes) -> None:
        """``key_pem_`` in the clear; written encrypted when ``password`` is set."""
        write_private(self.ca, ca_pem, 0o644)
        self.ca_writes += 1
        write_private(self.cert, cert_pem + self._key_out(load_key(key_pem_)))

    def _key_out(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        if self.password is None:
            return key_pem(key)
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(self.password))

    def chain_pem(self) -> bytes:
        """Every certificate in node.pem (the node's, then any intermediate)."""
        return bundle(*(c.public_bytes(serialization.Encoding.PEM)
                        for c in load_certs(self.cert.read_bytes())))

    def key(self) -> ec.EllipticCurvePrivateKey:
        """The node's private key (decrypted with ``password`` when set)."""
        data = self.cert.read_bytes()
        start = data.find(b"-----BEGIN ", data.rfind(b"-----END CERTIFICATE-----"))
        try:
            try:
                key = serialization.load_pem_private_key(data[start:], password=self.password)
            except TypeError:  # a password for a key in the clear (autolock just turned on)
                key = serialization.load_pem_private_key(data[start:], password=None)
        except (ValueError, TypeError) as exc:
            raise PkiError(f"cannot read the private key in {self.cert}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError("private key is not an EC key")
        return key

    def repassword(self, password: bytes | None) -> None:
        """Re-encrypt the key under ``password`` (None: in the clear), one atomic rename."""
        key, chain = self.key(), self.chain_pem()
        self.password = password
        write_private(self.cert, chain + self._key_out(key))

    def set_ca(self, ca_pem: bytes) -> None:
        write_private(self.ca, ca_pem, 0o644)
        self.ca_writes += 1

    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()

    def cert_pem(self) -> bytes:
        data = self.cert.read_bytes()
        end = data.find(b"-----END CERTIFICATE-----")
        if end < 0:
            raise PkiError(f"{self.cert} holds no certificate")
        return data[:end + len(b"-----END CERTIFICATE-----")] + b"\n"

    def info(self) -> CertInfo:
        return cert_info(self.cert_pem())

    def remove(self) -> None:
        for p in (self.cert, self.ca):
            p.unlink(missing_ok=True)


__all__ = [
    "CLOCK_SKEW", "DEFAULT_CERT_LIFETIME", "ROLES", "ROLE_CLIENT", "ROLE_MANAGER", "ROLE_WORKER",
    "CertInfo", "CertificateAuthority", "PkiError", "TlsFiles", "bundle", "ca_digest", "cert_info",
    "client_context", "create_ca", "key_pem", "load_certs", "load_key", "make_csr", "new_key",
    "node_hostname", "own_info", "peer_info", "role_hostname", "server_context",
    "unverified_client_context", "verify_issued", "verify_issued_by", "write_private",
]
