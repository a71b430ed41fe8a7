"""horde/synthetic: solve one Horde synthetic challenge (standard library only).

Find each secret s in [range_start, range_end) with sha256(salt || s as u64 big-endian) equal to
one of the digests.

Input: the environment variable HORDE_CHALLENGE, a JSON object
    {"salt": hex, "range_start": int, "range_end": int, "digests": [hex, ...],
     "backend": "auto" | "cpu" | "cuda", "workers": int}
"auto" uses CUDA when CuPy and a GPU are present (an image variant for GPU hosts adds CuPy), and
the CPU otherwise; "cuda" fails when CUDA is unavailable rather than falling back.

Output: one JSON line on stdout
    {"secrets": [int | null, ...], "backend": "cpu" | "cuda", "range_size": int, "seconds": float,
     "fallback": "why CUDA was not used" (only when it was asked for and not used)}
with the secrets in the order of the digests. Exit status 0 when every secret was found, 3 when
some were not, 2 on bad input.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence

Solver = Callable[[bytes, int, int, Sequence[bytes]], list[int | None]]
CHUNK = 1 << 16


def scan(salt: bytes, start: int, end: int, digests: Sequence[bytes]) -> dict[bytes, int]:
    """Hash every candidate in [start, end); stop early once every digest is found."""
    base = hashlib.sha256(salt)
    wanted = set(digests)
    found: dict[bytes, int] = {}
    for secret in range(start, end):
        h = base.copy()
        h.update(secret.to_bytes(8, "big"))
        d = h.digest()
        if d in wanted:
            found[d] = secret
            if len(found) == len(wanted):
                break
    return found


def _scan_args(args: tuple[bytes, int, int, list[bytes]]) -> dict[bytes, int]:
    return scan(*args)


def solve_cpu(
    salt: bytes, start: int, end: int, digests: Sequence[bytes], workers: int = 1
) -> list[int | None]:
    if workers <= 1 or end - start < 4 * CHUNK:
        found = scan(salt, start, end, digests)
    else:
        found = _solve_parallel(salt, start, end, digests, workers)
    return [found.get(d) for d in digests]


def _solve_parallel(
    salt: bytes, start: int, end: int, digests: Sequence[bytes], workers: int
) -> dict[bytes, int]:
    import multiprocessing

    step = max(CHUNK, (end - start) // (workers * 8))
    parts = [(salt, s, min(end, s + step), list(digests)) for s in range(start, end, step)]
    found: dict[bytes, int] = {}
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for part in pool.imap_unordered(_scan_args, parts):
                found.update(part)
                if len(found) == len(set(digests)):
                    pool.terminate()
                    break
    except OSError:
        # No /dev/shm for the pool's semaphores in some sandboxes: one process then.
        return scan(salt, start, end, digests)
    return found


# --------------------------------------------------------------------------------------- CUDA

CUDA_SOURCE = r"""
__constant__ unsigned int K[64] = {
0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};
__device__ __forceinline__ unsigned int ror(unsigned int x, int n) {
  return (x >> n) | (x << (32 - n)); }
extern "C" __global__ void search(const unsigned int* salt, unsigned long long start,
    unsigned long long count, const unsigned int* digests, int n, unsigned long long* found) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  unsigned long long s = start + i;
  unsigned int w[64];
  for (int j = 0; j < 8; j++) w[j] = salt[j];
  w[8] = (unsigned int)(s >> 32); w[9] = (unsigned int)s; w[10] = 0x80000000u;
  for (int j = 11; j < 15; j++) w[j] = 0;
  w[15] = 320;  /* 40 bytes of message, in bits */
  for (int j = 16; j < 64; j++) {
    unsigned int s0 = ror(w[j-15], 7) ^ ror(w[j-15], 18) ^ (w[j-15] >> 3);
    unsigned int s1 = ror(w[j-2], 17) ^ ror(w[j-2], 19) ^ (w[j-2] >> 10);
    w[j] = w[j-16] + s0 + w[j-7] + s1;
  }
  const unsigned int H[8] = {0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,
                             0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19};
  unsigned int a=H[0],b=H[1],c=H[2],d=H[3],e=H[4],f=H[5],g=H[6],h=H[7];
  for (int j = 0; j < 64; j++) {
    unsigned int t1 = h + (ror(e,6) ^ ror(e,11) ^ ror(e,25)) + ((e & f) ^ (~e & g)) + K[j] + w[j];
    unsigned int t2 = (ror(a,2) ^ ror(a,13) ^ ror(a,22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
  }
  unsigned int o[8] = {a+H[0],b+H[1],c+H[2],d+H[3],e+H[4],f+H[5],g+H[6],h+H[7]};
  for (int k = 0; k < n; k++) {
    const unsigned int* t = digests + 8 * k;
    if (o[0]==t[0] && o[1]==t[1] && o[2]==t[2] && o[3]==t[3] &&
        o[4]==t[4] && o[5]==t[5] && o[6]==t[6] && o[7]==t[7]) found[k] = s + 1;
  }
}
"""


def load_cuda() -> Solver:
    """A CUDA solver through CuPy; raises when CuPy or a GPU is missing."""
    import cupy  # type: ignore[import-not-found]  # not in the CPU image

    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no CUDA device")
    kernel = cupy.RawKernel(CUDA_SOURCE, "search")

    def solve(salt: bytes, start: int, end: int, digests: Sequence[bytes]) -> list[int | None]:
        salt_d = cupy.asarray(struct.unpack(">8I", salt), dtype=cupy.uint32)
        words = [w for d in digests for w in struct.unpack(">8I", d)]
        dig_d = cupy.asarray(words, dtype=cupy.uint32)
        found_d = cupy.zeros(len(digests), dtype=cupy.uint64)
        batch = 1 << 26
        for lo in range(start, end, batch):
            count = min(batch, end - lo)
            blocks = (count + 255) // 256
            kernel(
                (blocks,),
                (256,),
                (
                    salt_d,
                    cupy.uint64(lo),
                    cupy.uint64(count),
                    dig_d,
                    cupy.int32(len(digests)),
                    found_d,
                ),
            )
            if int((found_d == 0).sum()) == 0:
                break
        return [int(v) - 1 if int(v) else None for v in found_d.get()]

    return solve


def choose_backend(
    requested: str, workers: int, cuda_loader: Callable[[], Solver] = load_cuda
) -> tuple[str, Solver, str]:
    """(backend name, solver, why CUDA was not used) for the requested backend."""

    def cpu(salt: bytes, start: int, end: int, digests: Sequence[bytes]) -> list[int | None]:
        return solve_cpu(salt, start, end, digests, workers)

    if requested == "cpu":
        return "cpu", cpu, ""
    try:
        return "cuda", cuda_loader(), ""
    except Exception as exc:
        if requested == "cuda":
            raise
        return "cpu", cpu, f"{type(exc).__name__}: {exc}"


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    try:
        spec = json.loads(env["HORDE_CHALLENGE"])
        salt = bytes.fromhex(spec["salt"])
        start, end = int(spec["range_start"]), int(spec["range_end"])
        digests = [bytes.fromhex(d) for d in spec["digests"]]
        if len(salt) != 32 or any(len(d) != 32 for d in digests) or not 0 <= start < end:
            raise ValueError("salt and digests must be 32 bytes and the range non-empty")
        requested = str(spec.get("backend", "auto"))
        workers = max(1, int(spec.get("workers", 1)))
    except (KeyError, ValueError, TypeError) as exc:
        print(json.dumps({"error": f"bad challenge: {exc}"}))
        return 2
    t0 = time.perf_counter()
    try:
        backend, solver, fallback = choose_backend(requested, workers)
    except Exception as exc:
        print(json.dumps({"error": f"backend {requested} unavailable: {exc}"}))
        return 2
    found = solver(salt, start, end, digests)
    out: dict[str, object] = {
        "secrets": found,
        "backend": backend,
        "range_size": end - start,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    if fallback:
        out["fallback"] = fallback
    print(json.dumps(out), flush=True)
    return 0 if all(s is not None for s in found) else 3


if __name__ == "__main__":
    sys.exit(main())
