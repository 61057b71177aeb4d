"""Pack an onnxruntime-gpu wheel small enough to carry to a lent GPU machine (64 MiB per call).

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1 -d /tmp/ort
    python benchmarks/gpu_pack_onnxruntime.py /tmp/ort/onnxruntime_gpu-*.whl --arch 90 --out .gpu

The wheel is 255 MB, mostly ``libonnxruntime_providers_cuda.so``'s fat binary: one cubin per GPU
architecture (sm_75 ... sm_120).  A GPU runs only cubins of its own major architecture, so the
others are zeroed in place (offsets and headers kept; the CUDA driver reads the headers and loads
the matching cubin) and compress to nothing.  The C-API library (the Python binding links the
runtime statically) and the transformers tools are left out.  For an H100 (sm_90): 61 MB of
``.tar.xz``, written as ``ort.tar.xz.part-*`` pieces of 31 MiB; ``benchmarks/gpu_check.sh``
unpacks them.
"""
from __future__ import annotations

import argparse
import io
import lzma
import struct
import tarfile
import zipfile
from pathlib import Path

CUDA_PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
LEFT_OUT = ("onnxruntime/capi/libonnxruntime.so", "onnxruntime/transformers/")
FATBIN_MAGIC = 0xBA55ED50
PIECE_BYTES = 31 * 2 ** 20


def elf_section(data: bytes, wanted: str) -> tuple[int, int]:
    """File offset and size of the 64-bit little-endian ELF section named ``wanted``."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for name, _, _, _, offset, size in headers:
        end = data.index(b"\0", names_offset + name)
        if data[names_offset + name:end].decode() == wanted:
            return offset, size
    raise ValueError(f"no section {wanted} in the library")


def keep_one_architecture(library: bytes, arch: int) -> tuple[bytes, int]:
    """Zero every cubin of the ``.nv_fatbin`` section that is not for ``arch``; returns the
    library and how many fat binaries have no cubin for ``arch`` (their kernels cannot run there)."""
    data = bytearray(library)
    start, size = elf_section(library, ".nv_fatbin")
    position, without = start, 0
    while position < start + size:
        magic, _, header_size, body_size = struct.unpack_from("<IHHQ", data, position)
        if magic != FATBIN_MAGIC:
            position += 8  # fat binaries are 8-byte aligned
            continue
        entry, found = position + header_size, False
        while entry < position + header_size + body_size:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            entry_arch, = struct.unpack_from("<I", data, entry + 28)
            if entry_arch == arch:
                found = True
            else:
                data[entry + entry_header:entry + entry_header + payload] = bytes(payload)
            entry += entry_header + payload
        without += not found
        position += header_size + body_size
    return bytes(data), without


def pack(wheel: Path, arch: int, out: Path) -> list[Path]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(wheel) as archive, tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in archive.infolist():
            if not info.filename.startswith("onnxruntime/") or info.filename.startswith(LEFT_OUT):
                continue
            data = archive.read(info)
            if info.filename == CUDA_PROVIDER:
                data, without = keep_one_architecture(data, arch)
                print(f"{without} fat binaries have no sm_{arch} cubin")
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755
            tar.addfile(member, io.BytesIO(data))
    packed = lzma.compress(buffer.getvalue(), preset=6)
    out.mkdir(parents=True, exist_ok=True)
    pieces = []
    for index in range(0, len(packed), PIECE_BYTES):
        pieces.append(out / f"ort.tar.xz.part-{index // PIECE_BYTES:02d}")
        pieces[-1].write_bytes(packed[index:index + PIECE_BYTES])
    print(f"{len(packed) / 1e6:.1f} MB in {len(pieces)} pieces")
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--arch", type=int, default=90, help="the GPU's compute capability (H100: 90)")
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    args = parser.parse_args()
    pack(args.wheel, args.arch, args.out)


if __name__ == "__main__":
    main()
