"""The peer wire codec: protobuf bodies of the peer routes, shared by the server
(http_front.py) and the peer clients (peers.py, and peer_fetch.py through it).

Compatible with golang/groupcache and mailgun/groupcache (kcachepb.proto)::

    GetResponse { optional bytes value = 1; optional double minute_qps = 2;
                  optional int64 expire = 3; }            answer of GET <base>/<group>/<key>
    SetRequest  { group = 1; key = 2; value = 3; expire = 4; }   body of PUT <base>/...

``expire`` travels as Unix nanoseconds, 0 meaning none; here it is a Unix time in seconds
(a float), None meaning none.
"""

from . import kcachepb_pb2 as pb

PROTOBUF = b"application/x-protobuf"


def expire_to_ns(expire_at):
    return int(expire_at * 1e9) if expire_at else 0


def ns_to_expire(nanoseconds):
    return nanoseconds / 1e9 if nanoseconds else None


def encode_get_response(value, expire_at=None):
    message = pb.GetResponse(value=value)
    if expire_at:
        message.expire = expire_to_ns(expire_at)
    return message.SerializeToString()


def decode_get_response(body):
    """(value, expiry Unix time or None). ValueError if the body is not a GetResponse."""
    message = pb.GetResponse()
    try:
        message.ParseFromString(body)
    except Exception as exc:                  # protobuf's DecodeError and friends
        raise ValueError(f"not a GetResponse: {exc}") from None
    return message.value, ns_to_expire(message.expire)


def encode_set_request(group, key, value, expire_at=None):
    message = pb.SetRequest(group=group, key=key, value=value)
    if expire_at:
        message.expire = expire_to_ns(expire_at)
    return message.SerializeToString()


def decode_set_request(body):
    """(group, key, value, expiry Unix time or None). ValueError if the body is not a
    complete SetRequest."""
    message = pb.SetRequest()
    try:
        message.ParseFromString(body)
    except Exception as exc:
        raise ValueError(f"not a SetRequest: {exc}") from None
    if not message.IsInitialized():
        raise ValueError("SetRequest lacks group or key")
    return message.group, message.key, message.value, ns_to_expire(message.expire)
