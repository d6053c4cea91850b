"""The protobuf wire format written by hand, for test files in a
publisher's format (Caffe's .caffemodel) that share no code with the
library's reader."""


def varint(n):
    """A base-128 varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, payload):
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload
