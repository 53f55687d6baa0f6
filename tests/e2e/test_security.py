"""The front door with mutual TLS and bearer tokens, on a served cluster (real certificates made here).

A CA signs the server's certificate (SANs 127.0.0.1 and localhost) and a client's; another
CA stands in for an attacker's. Every call needs a client certificate from the CA and a
bearer token; health checks need the certificate only. Refusals are UNAVAILABLE (the TLS
handshake fails) or UNAUTHENTICATED with a message that says what to send.
"""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem_api.client import TandemClient
from tests.e2e.conftest import serve
from tests.helpers.tiny_models import make_tiny_hf_model

pytestmark = pytest.mark.usefixtures("ray_session")

MAX_MESSAGE = 64 << 10  # router.max_message_bytes of the secured cluster
TOKEN = "s3cret-token-for-tests"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(subject: str, key, issuer=None, issuer_key=None, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = b.sign(issuer_key or key, hashes.SHA256())
    return cert, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca, ca_pem = _cert("tandem test CA", ca_key, ca=True)
    _, other_pem = _cert("someone else's CA", other_key, ca=True)
    server_key, client_key = _key(), _key()
    _, server_pem = _cert("tandem router", server_key, ca, ca_key, server=True)
    _, client_pem = _cert("a gateway", client_key, ca, ca_key)
    files = {
        "ca": ca_pem,
        "other_ca": other_pem,
        "server": server_pem,
        "server_key": _pem_key(server_key),
        "client": client_pem,
        "client_key": _pem_key(client_key),
    }
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
    (d / "tokens").write_text(f"# tokens of the tests\n{TOKEN}\nsecond-valid-token\n")
    return d, files


@pytest.fixture(scope="module")
def secured(pki, tmp_path_factory):
    d, _ = pki
    tiny = make_tiny_hf_model(tmp_path_factory.mktemp("security"), "llama", vocab_size=512)
    with serve(
        str(tiny),
        ray_namespace="tandem-security",
        **{
            "both.block_size": 4,
            "router.tls_cert": str(d / "server.pem"),
            "router.tls_key": str(d / "server_key.pem"),
            "router.tls_client_ca": str(d / "ca.pem"),
            "router.auth_token_file": str(d / "tokens"),
            "router.max_message_bytes": MAX_MESSAGE,
        },
    ) as s:
        yield s


def client(s, files, token=TOKEN, ca="ca", cert=True) -> TandemClient:
    return TandemClient(
        s.address,
        token=token,
        tls_ca=files[ca],
        tls_cert=files["client"] if cert else None,
        tls_key=files["client_key"] if cert else None,
    )


def test_a_request_over_max_message_bytes_is_refused(secured, pki):
    """router.max_message_bytes caps what the port reads: a bigger request is RESOURCE_EXHAUSTED before
    any of it is parsed, and the next request is served."""
    _, files = pki
    c = client(secured, files)
    with pytest.raises(grpc.RpcError) as e:
        c.complete(prompt="x" * (MAX_MESSAGE + 1), max_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.details()
    _, ids, _ = c.complete(prompt="hello", max_tokens=2, temperature=0.0, ignore_eos=True)
    assert len(ids) == 2
    secured.cluster.check_pools()


def test_certificate_and_token_get_tokens(secured, pki):
    _, files = pki
    _, ids, last = client(secured, files).complete(prompt="hello", max_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(ids) == 4 and last.usage.completion_tokens == 4
    _, ids2, _ = client(secured, files, token="second-valid-token").complete(
        prompt="hello", max_tokens=4, temperature=0.0, ignore_eos=True
    )
    assert ids2 == ids
    secured.cluster.check_pools()


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_a_missing_or_wrong_token_is_unauthenticated(secured, pki, token):
    _, files = pki
    c = client(secured, files, token=token)
    for call in (lambda: c.complete(prompt="hello", max_tokens=2), c.server_info, lambda: c.scale_pool("prefill", 1)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in e.value.details() and "Traceback" not in e.value.details()


def test_a_non_bearer_scheme_is_refused(secured, pki):
    _, files = pki
    creds = grpc.ssl_channel_credentials(files["ca"], files["client_key"], files["client"])
    from tandem_api.v1 import generation_pb2 as pb
    from tandem_api.v1 import generation_pb2_grpc as pb_grpc

    with grpc.secure_channel(secured.address, creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GenerationStub(ch).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=10, metadata=(("authorization", f"Basic {TOKEN}"),)
            )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_the_certificate_but_no_token(secured, pki):
    _, files = pki
    creds = grpc.ssl_channel_credentials(files["ca"], files["client_key"], files["client"])
    with grpc.secure_channel(secured.address, creds) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("how", ["plaintext", "no client certificate", "server from another CA"])
def test_the_tls_handshake_refuses(secured, pki, how):
    _, files = pki
    if how == "plaintext":
        c = TandemClient(secured.address, token=TOKEN)
    elif how == "no client certificate":
        c = client(secured, files, cert=False)
    else:
        c = client(secured, files, ca="other_ca")
    with pytest.raises(grpc.RpcError) as e:
        c.complete(prompt="hello", max_tokens=2, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cli_speaks_tls_and_tokens(secured, pki, capsys):
    from deploy.cli import main

    d, _ = pki
    flags = [
        "--token-file",
        str(d / "tokens"),
        "--tls-ca",
        str(d / "ca.pem"),
        "--tls-cert",
        str(d / "client.pem"),
        "--tls-key",
        str(d / "client_key.pem"),
    ]
    assert main(["generate", "--server", secured.address, "--prompt", "hi", "--max-tokens", "3", "--json", *flags]) == 0
    assert '"completion_tokens": 3' in capsys.readouterr().out
    assert main(["generate", "--server", secured.address, "--prompt", "hi", "--token-file", "/nonexistent"]) == 2
    assert "cannot read the auth token file /nonexistent" in capsys.readouterr().err


def test_the_http_door_takes_the_same_certificates_and_tokens(secured, pki):
    """--tls-cert/--tls-key/--tls-client-ca and --auth-token-file apply to the OpenAI door as to gRPC:
    https only, a client certificate from the CA, a bearer token on everything but /health."""
    import ssl

    import httpx

    d, _ = pki
    url = secured.http_url
    assert url.startswith("https://")
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    ctx.load_cert_chain(str(d / "client.pem"), str(d / "client_key.pem"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(verify=ctx, timeout=30) as http:
        model = http.get(f"{url}/models", headers=auth).json()["data"][0]["id"]
        r = http.post(
            f"{url}/completions",
            headers=auth,
            json={"model": model, "prompt": "hello", "max_tokens": 3, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = http.post(f"{url}/completions", headers=headers, json={"model": model, "prompt": "x"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.get(f"{url.removesuffix('/v1')}/health").status_code == 200  # no token needed
    no_cert = ssl.create_default_context(cafile=str(d / "ca.pem"))
    for attempt in (
        lambda: httpx.get(f"{url}/models", headers=auth, verify=no_cert, timeout=10),
        lambda: httpx.get(f"{url.replace('https://', 'http://')}/models", headers=auth, timeout=10),
    ):
        with pytest.raises(httpx.TransportError):
            attempt()
    secured.cluster.check_pools()
