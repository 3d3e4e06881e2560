"""A Python grpcio client of containerd's Snapshots API, for tests/clients.rs.

grpcio (1.57 and later) sends the %-encoded socket path as :authority when
it dials `unix:PATH`, which is what this test is about. It needs no
generated stubs: the few messages it sends are encoded here by hand.

Usage: grpcio_snapshots.py SOCKET KEY
Prints one line per call: `prepare OK`, `stat NAME KIND`, `list N`, and
`stat-missing CODE` for a key that does not exist.
"""
import sys

import grpc

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"


def field(number, value):
    """A protobuf length-delimited field (strings and messages)."""
    data = value.encode() if isinstance(value, str) else value
    tag, length, out = (number << 3) | 2, len(data), bytearray()
    for v in (tag, length):
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out) + data


def fields(data):
    """(number, bytes) of the length-delimited and varint fields of a message."""
    def varint(i):
        shift = result = 0
        while True:
            b = data[i]
            result |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                return result, i
            shift += 7

    i = 0
    while i < len(data):
        tag, i = varint(i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"unexpected wire type {wire}")
        yield number, value


def main():
    socket, key = sys.argv[1], sys.argv[2]
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        def call(method, request, stream=False):
            make = channel.unary_stream if stream else channel.unary_unary
            return make(SERVICE + method)(request, timeout=10)

        call("Prepare", field(1, "ontop") + field(2, key))
        print("prepare OK")
        info = dict(fields(call("Stat", field(1, "ontop") + field(2, key))))
        info = dict(fields(info[1]))
        print("stat", info[1].decode(), info.get(3, 0))
        count = sum(
            sum(1 for n, _ in fields(batch) if n == 1)
            for batch in call("List", field(1, "ontop"), stream=True)
        )
        print("list", count)
        try:
            call("Stat", field(1, "ontop") + field(2, "no-such-key"))
            print("stat-missing OK")
        except grpc.RpcError as e:
            print("stat-missing", e.code().name, e.details())


main()
