"""What an adapter folder holds and how its weights file is read, with no heavy imports (the HTTP
client uses it too)."""

import json
import math

from ddft.errors import Invalid

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
REQUIRED = (CONFIG, WEIGHTS)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # refused, never loaded

MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def parse_safetensors(data: bytes, hint: str = "") -> dict:
    """The header's {tensor name: {dtype, shape, data_offsets}} read from bytes (nothing loaded, no
    torch), every offset checked against the file; Invalid (bad_safetensors) says what is wrong,
    then `hint`."""

    def bad(why: str) -> Invalid:
        return Invalid(code="bad_safetensors", detail=f"{WEIGHTS} {why}{hint}")

    if len(data) < 8:
        raise bad("is shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER):
        raise bad(f"declares a {n}-byte header in a {len(data)}-byte file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise bad("has a header that is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise bad("has a malformed header")
    if not header:
        raise bad("holds no tensors")
    body, spans = len(data) - 8 - n, []
    for key, t in header.items():
        if not (
            isinstance(t, dict)
            and isinstance(t.get("dtype"), str)
            and _ints(t.get("shape"))
            and _ints(t.get("data_offsets"))
            and len(t["data_offsets"]) == 2
        ):
            raise bad(f"has a malformed entry for tensor {key!r}")
        begin, end = t["data_offsets"]
        if not 0 <= begin <= end <= body:
            raise bad(f"is truncated: tensor {key!r} needs bytes {begin}-{end} but the data section has {body}")
        size = _ITEMSIZE.get(t["dtype"])
        if size and end - begin != math.prod(t["shape"]) * size:
            raise bad(
                f"has {end - begin} bytes for tensor {key!r}, but {t['dtype']} {t['shape']} needs "
                f"{math.prod(t['shape']) * size}"
            )
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise bad(f"has tensors that overlap or leave gaps (at byte {pos} of the data section)")
        pos = end
    if pos != body:
        raise bad(f"has a {body}-byte data section but its tensors account for {pos} bytes")
    return header


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)
