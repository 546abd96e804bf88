"""Write a GGUF file again with its quantized weights in another type, everything else as it was.

The demo draft's layers went from Q8_0 to Q4_1 this way: our engine runs a Q8_0 weight as two 4-bit
matrices, so a Q4_1 layer costs half the matmuls and half the bytes, and the draft's acceptance held
(models/MODEL_CARD.md).

    python -m tools.requantize models/draft.Q8_0.gguf models/draft.Q4_1.gguf --type q4_1 --keep token_embd.weight

Each quantized weight is dequantized and quantized again by gguf-py; float tensors (norms), the ones named
by --keep, and the metadata are copied, except general.file_type, which names the new type.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from tools.write_gguf import DTYPES

QUANTIZED = {T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K}  # what is read back and written again
TYPES = ("q8_0", "q4_0", "q4_1")  # what gguf-py writes and our engine packs


def requantize(src: str | Path, dst: str | Path, dtype: str, keep: Sequence[str] = ()) -> dict[str, T]:
    """Write src's weights to dst in `dtype` (one of TYPES); returns each tensor's type in dst."""
    if dtype not in TYPES:
        raise ValueError(f"unsupported type {dtype!r}: choose {', '.join(TYPES)}")
    qtype, ftype = DTYPES[dtype]
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError("the output must be another file than the input")
    reader = gguf.GGUFReader(src)
    names = {t.name for t in reader.tensors}
    if missing := sorted(set(keep) - names):
        raise ValueError(f"--keep names no tensor of {src}: {', '.join(missing)}")
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer makes these itself
        value = int(ftype) if key == "general.file_type" else field.contents()
        writer.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    types = {}
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for t in reader.tensors:
        rows = np.asarray(t.data)
        if t.tensor_type in QUANTIZED and t.name not in keep and int(t.shape[0]) % block == 0:
            values = gguf.quants.dequantize(rows, t.tensor_type)
            writer.add_tensor(t.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
            types[t.name] = qtype
        else:
            writer.add_tensor(t.name, rows, raw_dtype=t.tensor_type)
            types[t.name] = t.tensor_type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.requantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="GGUF file to read")
    ap.add_argument("dst", type=Path, help="GGUF file to write")
    ap.add_argument("--type", required=True, choices=TYPES, help="the weights' new type")
    ap.add_argument("--keep", action="append", default=[], metavar="TENSOR", help="copy this tensor as it is")
    args = ap.parse_args(argv)
    if not args.src.is_file():
        ap.error(f"{args.src}: no such file")
    try:
        types = requantize(args.src, args.dst, args.type, args.keep)
    except ValueError as exc:
        ap.error(str(exc))
    changed = sum(1 for t in types.values() if t == DTYPES[args.type][0])
    print(f"wrote {args.dst}: {args.dst.stat().st_size:,} bytes, {changed} of {len(types)} tensors {args.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
