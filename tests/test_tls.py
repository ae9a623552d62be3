"""TLS certificates are verified (DEVELOPERS.md's non-negotiables; docs/audit.md).

The real extension against an https endpoint on 127.0.0.1 whose certificate a test
made: not trusted, the call fails (502 UpstreamUnreachable, no value); trusted through
SSL_CERT_FILE (OpenSSL's default verify paths, which ssl.create_default_context loads),
the value is served; trusted but issued for another host name, the call fails again.
So both the chain and the host name are checked, as ssl.create_default_context does.
"""

import datetime
import http.server
import ipaddress
import json
import ssl
import threading

import pytest

from conftest import ssm_path

NAME = "/tls/p"


def make_certificate(directory, host_names, ip_addresses):
    """(certificate path, key path) of a self-signed certificate for the names given."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test endpoint")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(name) for name in host_names] + [x509.IPAddress(ipaddress.ip_address(ip))
                                                          for ip in ip_addresses]
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Endpoint:
    """An https GetParameter endpoint on 127.0.0.1 with the given certificate; .calls
    counts the calls that got through the handshake."""

    def __init__(self, cert_path, key_path):
        self.calls = 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.calls += 1
                body = json.dumps({"Parameter": {"Name": NAME, "Type": "String", "Value": "over-tls", "Version": 1,
                                                 "ARN": "arn:aws:ssm:us-east-1:123456789012:parameter" + NAME}})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint_for(tmp_path):
    made = []

    def start(host_names, ip_addresses):
        directory = tmp_path / f"cert{len(made)}"
        directory.mkdir()
        cert_path, key_path = make_certificate(directory, host_names, ip_addresses)
        made.append(Endpoint(cert_path, key_path))
        return made[-1], cert_path

    yield start
    for endpoint in made:
        endpoint.close()


def test_an_untrusted_certificate_is_refused(endpoint_for, start_extension):
    endpoint, _ = endpoint_for(["localhost"], ["127.0.0.1"])
    ext = start_extension(endpoint.url, env={"SSM_PARAMETER_STORE_TIMEOUT_MILLIS": 3000})
    status, _, body = ext.get(ssm_path(NAME), timeout=20)
    assert (status, json.loads(body)["__type"]) == (502, "UpstreamUnreachable")
    assert endpoint.calls == 0  # no request went out over the unverified connection
    assert "over-tls" not in body.decode()


def test_a_trusted_certificate_for_the_host_is_served(endpoint_for, start_extension):
    endpoint, cert_path = endpoint_for(["localhost"], ["127.0.0.1"])
    ext = start_extension(endpoint.url, env={"SSL_CERT_FILE": str(cert_path)})
    status, _, body = ext.get(ssm_path(NAME), timeout=20)
    assert status == 200, body
    assert json.loads(body)["Parameter"]["Value"] == "over-tls"
    assert endpoint.calls == 1


def test_a_trusted_certificate_for_another_host_is_refused(endpoint_for, start_extension):
    endpoint, cert_path = endpoint_for(["ssm.us-east-1.amazonaws.com"], [])
    ext = start_extension(endpoint.url, env={"SSL_CERT_FILE": str(cert_path),
                                             "SSM_PARAMETER_STORE_TIMEOUT_MILLIS": 3000})
    status, _, body = ext.get(ssm_path(NAME), timeout=20)
    assert (status, json.loads(body)["__type"]) == (502, "UpstreamUnreachable")
    assert endpoint.calls == 0
