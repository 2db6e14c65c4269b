"""Certificates made at run time for the TLS tests: CAs, and server certificates they sign.

With the ``openssl`` command when there is one, else with the ``cryptography`` package (a
test dependency). SHMCACHE_TEST_CERTS=cryptography forces the latter.
"""

import datetime
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path


def make_ca(directory, stem="ca", common_name="shmcache test CA"):
    """(certificate path, key path) of a new self-signed CA in ``directory``."""
    directory = Path(directory)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    if _use_openssl():
        _openssl("req", "-x509", "-new", *_EC_KEY, "-nodes", "-keyout", key, "-out", cert,
                 "-days", "2", "-subj", f"/CN={common_name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    else:
        _cryptography_ca(cert, key, common_name)
    return str(cert), str(key)


def make_server_cert(directory, ca, names=("localhost", "127.0.0.1"), stem="server"):
    """(certificate path, key path) of a server certificate for ``names`` (DNS names or IP
    addresses), signed by the CA ``ca`` = (certificate path, key path)."""
    directory = Path(directory)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    if _use_openssl():
        csr, ext = directory / f"{stem}.csr", directory / f"{stem}.ext"
        ext.write_text(f"subjectAltName={','.join(_san(name) for name in names)}\n"
                       "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=serverAuth\n")
        _openssl("req", "-new", *_EC_KEY, "-nodes", "-keyout", key, "-out", csr,
                 "-subj", f"/CN={names[0]}")
        _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial",
                 str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-out", cert,
                 "-extfile", ext)
    else:
        _cryptography_server(cert, key, ca, names)
    return str(cert), str(key)


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _use_openssl():
    return os.environ.get("SHMCACHE_TEST_CERTS") != "cryptography" and shutil.which("openssl")


def _openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _san(name):
    try:
        ipaddress.ip_address(name)
        return f"IP:{name}"
    except ValueError:
        return f"DNS:{name}"


# -- the same with the cryptography package ----------------------------------------------------

def _cryptography_ca(cert_path, key_path, common_name):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (_builder(name, name, key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                            False), critical=True))
    _write(cert_path, key_path, builder, key, key)


def _cryptography_server(cert_path, key_path, ca, names):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_cert = x509.load_pem_x509_certificate(Path(ca[0]).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca[1]).read_bytes(), None)
    key = _new_key()
    alternatives = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = (_builder(subject, ca_cert.subject, key.public_key())
               .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False))
    _write(cert_path, key_path, builder, key, ca_key)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject, issuer, public_key):
    from cryptography import x509
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2)))


def _write(cert_path, key_path, builder, key, signing_key):
    from cryptography.hazmat.primitives import hashes, serialization
    certificate = builder.sign(signing_key, hashes.SHA256())
    Path(cert_path).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
