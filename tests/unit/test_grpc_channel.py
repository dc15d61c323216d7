"""The proxies' gRPC client (`xds.channel`) against grpcio's server, the real peer, over TLS
and over cleartext on loopback; and against peers that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from meshway.api.v1 import ca_pb2, ca_pb2_grpc
from meshway.identity.ca import CertificateAuthority
from meshway.identity.caclient import CREATE_CERTIFICATE
from meshway.xds.channel import GrpcChannel, GrpcError, StatusCode
from meshway.xds.client import CONTROL_PLANE_NAME

pytestmark = pytest.mark.unit

STREAM = "/meshway.api.v1.CertificateService/Stream"


class Service(ca_pb2_grpc.CertificateServiceServicer):
    """CreateCertificate answers with the CSR it got, or fails as the CSR asks."""

    async def CreateCertificate(
        self, request: ca_pb2.CertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.CertificateResponse:
        metadata = dict(context.invocation_metadata() or ())
        if request.csr == "deny":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you: 100% sure")
        if request.csr == "slow":
            await asyncio.sleep(5)
        return ca_pb2.CertificateResponse(
            cert_chain=[request.csr, metadata.get("authorization", "")],
            trust_bundle=[str(context.time_remaining() is not None)],
        )


async def echo_stream(
    requests: AsyncIterator[ca_pb2.CertificateRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[ca_pb2.CertificateResponse]:
    async for request in requests:
        if request.csr == "end":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")
        yield ca_pb2.CertificateResponse(cert_chain=[request.csr * 2])


@contextlib.asynccontextmanager
async def grpc_server(tls: CertificateAuthority | None) -> AsyncIterator[int]:
    server = grpc.aio.server()
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(Service(), server)
    handler = grpc.method_handlers_generic_handler(
        "meshway.api.v1.CertificateService",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(
                echo_stream,
                request_deserializer=ca_pb2.CertificateRequest.FromString,
                response_serializer=ca_pb2.CertificateResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        chain, key = tls.issue_serving_certificate([CONTROL_PLANE_NAME])
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")


def channel_for(port: int, ca: CertificateAuthority | None, **options: float) -> GrpcChannel:
    return GrpcChannel(
        f"127.0.0.1:{port}",
        root_certificates=ca.trust_bundle.to_pem() if ca is not None else None,
        server_name=CONTROL_PLANE_NAME if ca is not None else None,
        **options,  # type: ignore[arg-type]
    )


async def sign(channel: GrpcChannel, csr: str, timeout: float = 5) -> ca_pb2.CertificateResponse:
    return await channel.unary(
        CREATE_CERTIFICATE,
        ca_pb2.CertificateRequest(csr=csr),
        ca_pb2.CertificateResponse,
        timeout=timeout,
    )


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "cleartext"])
async def test_unary_calls_metadata_deadline_and_status(
    ca: CertificateAuthority, secure: bool
) -> None:
    async with grpc_server(ca if secure else None) as port:
        channel = channel_for(port, ca if secure else None)
        try:
            answer = await channel.unary(
                CREATE_CERTIFICATE,
                ca_pb2.CertificateRequest(csr="hello"),
                ca_pb2.CertificateResponse,
                metadata=[("Authorization", "Bearer t0k3n")],
                timeout=5,
            )
            # The metadata arrived, and so did the deadline (grpc-timeout).
            assert list(answer.cert_chain) == ["hello", "Bearer t0k3n"]
            assert list(answer.trust_bundle) == ["True"]
            with pytest.raises(GrpcError) as denied:
                await sign(channel, "deny")
            assert denied.value.code is StatusCode.PERMISSION_DENIED
            assert denied.value.details == "not you: 100% sure"  # percent-decoded
            with pytest.raises(GrpcError) as late:
                await sign(channel, "slow", 0.3)
            assert late.value.code is StatusCode.DEADLINE_EXCEEDED
            # The connection survives a failed call: the next one works.
            again = await sign(channel, "again")
            assert again.cert_chain[0] == "again"
        finally:
            await channel.close()


async def test_bidirectional_stream_and_its_final_status(ca: CertificateAuthority) -> None:
    async with grpc_server(ca) as port:
        channel = channel_for(port, ca)
        try:
            async with channel.stream(STREAM, ca_pb2.CertificateResponse) as call:
                call.send(ca_pb2.CertificateRequest(csr="a"))
                got = []
                with pytest.raises(GrpcError) as ended:
                    async for response in call:
                        got.append(response.cert_chain[0])
                        if len(got) < 3:
                            call.send(ca_pb2.CertificateRequest(csr=str(len(got)) * 70_000))
                        else:
                            call.send(ca_pb2.CertificateRequest(csr="end"))
            # Large messages span several DATA frames (and flow-control windows).
            assert got == ["aa", "1" * 140_000, "2" * 140_000]
            assert ended.value.code is StatusCode.RESOURCE_EXHAUSTED
        finally:
            await channel.close()


async def test_a_wrong_certificate_authority_is_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other", "cluster.local")
    async with grpc_server(ca) as port:
        channel = channel_for(port, other)
        with pytest.raises(GrpcError) as refused:
            await sign(channel, "x")
        assert refused.value.code is StatusCode.UNAVAILABLE
        assert "certificate verify failed" in refused.value.details
        await channel.close()


@contextlib.asynccontextmanager
async def raw_server(answer: bytes) -> AsyncIterator[int]:
    """A TCP peer that reads everything, writes `answer` once, and never says more."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if answer:
            writer.write(answer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_keepalive_finds_a_silent_peer() -> None:
    # An HTTP/2 SETTINGS frame, then silence: no PING is ever acknowledged.
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    async with raw_server(settings) as port:
        channel = channel_for(port, None, keepalive=0.2, keepalive_timeout=0.3)
        started = asyncio.get_running_loop().time()
        with pytest.raises(GrpcError) as dead:
            async with channel.stream(STREAM, ca_pb2.CertificateResponse) as call:
                call.send(ca_pb2.CertificateRequest(csr="anyone?"))
                async with asyncio.timeout(5):
                    async for _ in call:
                        pass
        assert dead.value.code is StatusCode.UNAVAILABLE
        assert asyncio.get_running_loop().time() - started < 3
        await channel.close()


async def test_a_peer_that_is_not_http2_fails_the_call_clearly() -> None:
    async with raw_server(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n") as port:
        channel = channel_for(port, None)
        with pytest.raises(GrpcError) as failed:
            await sign(channel, "x")
        assert failed.value.code is StatusCode.UNAVAILABLE
        await channel.close()


async def test_nothing_listening_is_unavailable() -> None:
    async with raw_server(b"") as port:
        pass  # closed again: the port is free
    channel = channel_for(port, None)
    with pytest.raises(GrpcError) as failed:
        await sign(channel, "x")
    assert failed.value.code is StatusCode.UNAVAILABLE
    assert "cannot connect" in failed.value.details
    await channel.close()
