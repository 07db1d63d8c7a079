#!/usr/bin/env python3
"""Regenerate the NF4 fixtures under tests/fixtures/nf4/ (bitsandbytes as the oracle).

Run from the repository root (CPU only, no GPU, no network, about half a minute):

    .venv/bin/python scripts/make_nf4_fixtures.py

Pinned: bitsandbytes 0.49.2 and torch 2.9.1 (the script refuses other versions), and torch's CPU kernels
pinned to AVX2 (ATEN_CPU_CAPABILITY=avx2, set before torch is imported): bitsandbytes builds its 8-bit
map with torch.linspace, whose AVX2/AVX-512 kernels fuse a multiply-add that torch's plain DEFAULT
kernel does not (different last bits), and its double-quantization offset with torch.mean, whose
summation order is part of the result (torch_mean.safetensors shows it does not depend on AVX2 vs
AVX-512, only on the thread count).

What and why
------------
moelab's NF4 format (optimized/nf4) is what bitsandbytes' CUDA kernels produce for quant_type="nf4".
No GPU is at hand, so the oracle is bitsandbytes 0.49.2 on the CPU, whose quantize_4bit
(backends/default/ops.py) and nested 8-bit quantizer (csrc/cpu_ops.cpp) follow the CUDA rules on ordinary
data. This script checks that claim instead of assuming it: it also quantizes every case with a NumPy
transcription of the CUDA rules (kQuantizeBlockwise + dQuantizeNF4, dQuantize<0>) and records every
disagreement in the README and in the files' metadata. Where the CPU path cannot follow the CUDA rules
(odd element counts, exact midpoints, the -1.0 that the CPU quantizer writes into the 8-bit map, the 8-bit
tie rule) the fixtures hold probes that show the difference, and the C++ tests check the CUDA rule
directly.

Files written (all small; < 1 MB in total):
  cases.safetensors            seeded random tensors of several shapes, scales and distributions
                               (normal, uniform, Student-t, zero/constant/outlier blocks, an odd element
                               count), quantized with blocksize 32 ... 4096, with and without double
                               quantization; inputs, packed codes, absmax / qabsmax / nested absmax /
                               offset, dequantized values; the NF4 table, the fresh dynamic map and the
                               map as bitsandbytes' CPU path leaves it; the midpoint and 8-bit tie probes.
  torch_mean.safetensors       torch.mean of float32 vectors (made from an integer formula the C++ test
                               repeats) under ATEN_CPU_CAPABILITY avx2 and avx512 and 1, 2, 3 threads: the
                               summation order behind the double-quantization offset.
  linear4bit_state_dict.safetensors
                               bitsandbytes' own serialized form: three Linear4bit layers' state_dict
                               (nested float32, nested bfloat16, plain with blocksize 128) saved with
                               safetensors.torch.save_file, as transformers 4.x saves a bnb-4bit model.
  linear4bit_expected.safetensors
                               the weights those layers were made from and bitsandbytes' dequantization.
  README.md                    how they were made, what each tensor is, and the CPU-vs-CUDA findings.
"""

import os
import sys

if "--mean-worker" not in sys.argv:  # the torch.mean workers get their capability from the parent
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # must precede `import torch`; see the docstring

import json
import subprocess
from pathlib import Path

import numpy as np
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_impl
from safetensors.torch import save_file

BNB_VERSION = "0.49.2"
TORCH_VERSION = "2.9.1"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nf4"

# The CUDA kernel's dQuantizeNF4 thresholds, ascending, as the float bit patterns nvcc makes of its
# literals (`x > -0.8480964004993439f` ...; read from `nvcc -ptx`). They are given as bits because
# np.float32(-0.8480964004993439) rounds through float64 and lands one ulp away for 4 of the 15
# (indices 0, 8, 12, 14), where nvcc and C++ compilers round the decimal literal directly to float.
CUDA_THRESHOLDS = np.array(
    [0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
     0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9],
    dtype=np.uint32).view(np.float32)


# ------------------------------------------------------------------------------------------------
# The CUDA rules in NumPy, only to compare bitsandbytes' CPU output with them.

def cuda_nf4_codes(x: np.ndarray, blocksize: int):
    """kQuantizeBlockwise<NF4>: absmax per block, x * (1/absmax), strict '>' tree; pad nibble = code of 0."""
    x = x.astype(np.float32).reshape(-1)
    n = x.size
    nb = -(-n // blocksize)
    absmax = np.zeros(nb, np.float32)
    codes = np.zeros(n + (n % 2), np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in range(nb):
            blk = x[b * blocksize:(b + 1) * blocksize]
            absmax[b] = np.max(np.abs(blk))
            inv = np.float32(1.0) / absmax[b]
            scaled = blk * inv
            if b == nb - 1 and n % 2:
                scaled = np.append(scaled, np.float32(0.0) * inv)
            c = np.searchsorted(CUDA_THRESHOLDS, scaled, side="left").astype(np.uint8)  # #thresholds < x
            c[np.isnan(scaled)] = 0  # every '>' is false
            codes[b * blocksize:b * blocksize + c.size] = c
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.reshape(-1, 1), absmax


def cuda_dquantize(x: np.float32, code: np.ndarray) -> int:
    """dQuantize<0>: 7-step binary search, then the nearer neighbour by the float midpoint."""
    p = 127
    for step in (64, 32, 16, 8, 4, 2, 1):
        p = p + step if x > code[p] else p - step
    if x > code[p]:
        mid = np.float32((code[p] + code[p + 1]) * np.float32(0.5))
        return p + 1 if x > mid else p
    if p == 0:
        return 0
    mid = np.float32((code[p - 1] + code[p]) * np.float32(0.5))
    return p - 1 if x < mid else p


def cuda_blockwise8(a: np.ndarray, code: np.ndarray, blocksize: int = 256):
    a = a.astype(np.float32)
    nb = -(-a.size // blocksize)
    absmax = np.zeros(nb, np.float32)
    q = np.zeros(a.size, np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in range(nb):
            blk = a[b * blocksize:(b + 1) * blocksize]
            absmax[b] = np.max(np.abs(blk))
            inv = np.float32(1.0) / absmax[b]
            for i, v in enumerate(blk * inv):
                q[b * blocksize + i] = cuda_dquantize(np.float32(v), code)
    return q, absmax


# ------------------------------------------------------------------------------------------------

def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def make_inputs() -> dict:
    torch.manual_seed(20240611)
    inputs = {
        "normal_0p02_64x64": torch.randn(64, 64) * 0.02,
        "normal_1_128x96": torch.randn(128, 96),
        "normal_0p5_33x7": torch.randn(33, 7) * 0.5,  # 231 elements: odd, not a multiple of any block
        "uniform_64x128": (torch.rand(64, 128) * 2 - 1) * 0.1,
        "student_t_96x64": torch.distributions.StudentT(2.5).sample((96, 64)) * 0.01,
        "normal_0p015_5x4096": torch.randn(5, 4096) * 0.015,  # 320 blocks: two nested blocks, one partial
        "small_32x96": torch.randn(32, 96) * 0.05,
    }
    special = torch.zeros(6, 64)
    special[1, 17] = 0.25                       # one nonzero value in a block of zeros
    special[2, :] = 0.5                         # constant block
    special[3, :] = 1e-3 * (1 - 2 * (torch.arange(64) % 2))  # alternating +-1e-3
    special[4, :] = torch.randn(64) * 0.01
    special[4, 40] = 3.0                        # one outlier
    special[5, :] = torch.randn(64) * 1e-30     # tiny but normal floats
    inputs["special_6x64"] = special            # row 0 is an all-zero block
    # Exact NF4 thresholds and their float neighbours in a block whose absmax is 1.0 (so x * inv == x).
    probe = [1.0]
    for t in CUDA_THRESHOLDS:
        probe += [np.nextafter(t, np.float32(-2)), t, np.nextafter(t, np.float32(2))]
    probe += [0.0] * (64 - len(probe))
    inputs["midpoints_1x64"] = torch.tensor(np.array(probe, np.float32)).reshape(1, 64)
    return {k: f32(v) for k, v in inputs.items()}


VARIANTS = [  # (input, blocksize, double quantization)
    ("normal_0p02_64x64", 64, True), ("normal_0p02_64x64", 64, False),
    ("normal_1_128x96", 64, True), ("normal_1_128x96", 64, False), ("normal_1_128x96", 32, True),
    ("normal_0p5_33x7", 64, True), ("normal_0p5_33x7", 64, False), ("normal_0p5_33x7", 4096, True),
    ("uniform_64x128", 64, True), ("uniform_64x128", 64, False),
    ("student_t_96x64", 64, True), ("student_t_96x64", 64, False), ("student_t_96x64", 128, False),
    ("normal_0p015_5x4096", 64, True), ("normal_0p015_5x4096", 64, False),
    ("small_32x96", 32, False), ("small_32x96", 128, True), ("small_32x96", 256, False),
    ("small_32x96", 512, True), ("small_32x96", 1024, False), ("small_32x96", 2048, True),
    ("small_32x96", 4096, False),
    ("special_6x64", 64, True), ("special_6x64", 64, False),
    ("midpoints_1x64", 64, False),
]


def dequantize_flat(q: torch.Tensor, s) -> torch.Tensor:
    """functional.dequantize_4bit, with bitsandbytes' pure-torch kernel (backends/default) in place of
    the native CPU one: on an AVX-512 CPU the native kernel indexes absmax per row (absmax_dim_1 =
    n_cols / blocksize), which is wrong when a row is not a whole number of blocks (see the README).
    For float32 output the torch kernel computes code[q] * absmax[i // blocksize] over the flattened
    tensor, as the CUDA kernel does."""
    assert s.dtype == torch.float32  # the torch kernel rounds the code table to the output dtype first
    absmax = s.absmax
    if s.nested:
        absmax = F.dequantize_blockwise(s.absmax, s.state2)
        absmax += s.offset
        absmax = absmax.float()
    return _dequantize_4bit_impl(q, absmax, s.blocksize, s.quant_type, s.shape, s.dtype)


def quantize_case(x: torch.Tensor, blocksize: int, nested: bool):
    """bitsandbytes CPU quantize_4bit + dequantize_4bit. For an odd element count 0.49.2's CPU packing
    fails (quantized[::2] << 4 | quantized[1::2] has mismatched lengths), so the input gets one trailing
    0.0: that is exactly what the CUDA kernel does (it loads past the end as 0.0 in the same block, and
    0.0 cannot change the block's absmax), and ceil(n / blocksize) is unchanged because n is odd."""
    flat = x.reshape(-1)
    n = flat.numel()
    padded = n % 2 == 1
    src = torch.cat([flat, torch.zeros(1)]) if padded else x
    q, s = F.quantize_4bit(src, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    d = dequantize_flat(q, s).reshape(-1)[:n].reshape(x.shape)
    native = F.dequantize_4bit(q, s).reshape(-1)[:n].reshape(x.shape)
    native_wrong = int((native != d).sum())
    return q, s, f32(d), padded, native_wrong


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def build_cases(findings: dict):
    tensors, cases = {}, []
    fresh_map = F.create_dynamic_map()  # before any quantize_blockwise call mutates the cached map
    assert fresh_map[0].item() != -1.0
    tensors["nf4_code"] = f32(F.get_4bit_type("nf4", device="cpu"))
    tensors["dynamic_map"] = f32(fresh_map)
    cuda_map = fresh_map.numpy()

    inputs = make_inputs()
    for name, x in inputs.items():
        tensors[f"input.{name}"] = x

    diff_rows = []
    for name, bs, nested in VARIANTS:
        x = inputs[name]
        case = f"{name}.bs{bs}.{'dq' if nested else 'plain'}"
        q, s, d, padded, native_wrong = quantize_case(x, bs, nested)
        tensors[f"{case}.packed"] = q.contiguous()
        tensors[f"{case}.dequant"] = d
        row = {"case": case, "padded": padded, "native_dequant_elements_wrong": native_wrong}
        cuda_packed, cuda_absmax = cuda_nf4_codes(x.numpy(), bs)
        row["codes_equal_cuda_rule"] = bits_equal(q.numpy(), cuda_packed)
        row["code_bytes_differing"] = int((q.numpy() != cuda_packed).sum())
        if nested:
            tensors[f"{case}.qabsmax"] = s.absmax.contiguous()
            tensors[f"{case}.nested_absmax"] = f32(s.state2.absmax)
            tensors[f"{case}.offset"] = f32(s.offset.reshape(1))
            # The 8-bit step by the CUDA rule from bnb's own 4-bit absmax and offset.
            plain_absmax = F.quantize_4bit(torch.cat([x.reshape(-1), torch.zeros(1)]) if padded else x,
                                           blocksize=bs, quant_type="nf4")[1].absmax.numpy()
            row["absmax_equal_cuda_rule"] = bits_equal(plain_absmax, cuda_absmax)
            centered = plain_absmax - s.offset.numpy()
            q8, a8 = cuda_blockwise8(centered, cuda_map)
            row["qabsmax_equal_cuda_rule"] = bits_equal(s.absmax.numpy(), q8)
            row["qabsmax_differing"] = int((s.absmax.numpy() != q8).sum())
            row["nested_absmax_equal_cuda_rule"] = bits_equal(s.state2.absmax.numpy(), a8)
            row["qabsmax_zero_codes"] = int((s.absmax.numpy() == 0).sum())
            row["nested_map0"] = float(s.state2.code[0])
            # Dequantized with the CUDA map: differs from bnb's only where a code 0 is rebuilt.
            rebuilt = (cuda_map[s.absmax.numpy()] * np.repeat(s.state2.absmax.numpy(), 256)[:q8.size]).astype(np.float32)
            rebuilt = (rebuilt + s.offset.numpy()).astype(np.float32)
            codes = np.stack([q.numpy().reshape(-1) >> 4, q.numpy().reshape(-1) & 15], 1).reshape(-1)[:x.numel()]
            dq_cuda = (tensors["nf4_code"].numpy()[codes] * np.repeat(rebuilt, bs)[:x.numel()]).astype(np.float32)
            row["dequant_elements_differing_with_cuda_map"] = int((dq_cuda != d.numpy().reshape(-1)).sum())
        else:
            tensors[f"{case}.absmax"] = f32(s.absmax)
            row["absmax_equal_cuda_rule"] = bits_equal(s.absmax.numpy(), cuda_absmax)
        diff_rows.append(row)
        cases.append({"case": case, "input": name, "blocksize": bs, "nested": nested,
                      "shape": list(x.shape), "padded_for_odd_n": padded})

    # The map as the CPU path leaves it: quantize_cpu() sets code[0] = -1.0 in the cached map.
    cpu_map = F.name2qmap["dynamic"]
    tensors["dynamic_map_after_cpu_quantize"] = f32(cpu_map)
    findings["cpu_map_entry0"] = float(cpu_map[0])
    findings["fresh_map_entry0"] = float(fresh_map[0])
    findings["cases"] = diff_rows

    # Midpoint probe: bnb CPU codes vs the CUDA tree at each threshold.
    mp = inputs["midpoints_1x64"].reshape(-1).numpy()
    bnb_codes = tensors["midpoints_1x64.bs64.plain.packed"].numpy().reshape(-1)
    bnb_codes = np.stack([bnb_codes >> 4, bnb_codes & 15], 1).reshape(-1)
    cuda_codes = np.searchsorted(CUDA_THRESHOLDS, mp, side="left")
    findings["midpoint_probe"] = [
        {"x": float(mp[i]), "cuda": int(cuda_codes[i]), "bnb_cpu": int(bnb_codes[i])}
        for i in range(1, 46) if cuda_codes[i] != bnb_codes[i]]

    # 8-bit tie probe: absmax 1.0, then the float midpoint of every pair of neighbouring map entries.
    mids = [np.float32((cuda_map[k] + cuda_map[k + 1]) * np.float32(0.5)) for k in range(255)]
    tie_in = torch.tensor(np.array([1.0] + mids, np.float32))
    tie_q, tie_state = F.quantize_blockwise(tie_in, blocksize=256)
    tensors["tie8.input"] = tie_in
    tensors["tie8.codes_bnb_cpu"] = tie_q.contiguous()
    tensors["tie8.absmax"] = f32(tie_state.absmax)
    cuda_tie = np.array([cuda_dquantize(np.float32(v), cuda_map) for v in tie_in.numpy()], np.uint8)
    findings["tie8_differing"] = int((cuda_tie != tie_q.numpy()).sum())
    findings["tie8_first_differences"] = [
        {"k": int(i) - 1, "cuda": int(cuda_tie[i]), "bnb_cpu": int(tie_q[i])}
        for i in np.nonzero(cuda_tie != tie_q.numpy())[0][:6]]

    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    # One metadata key per file: safetensors keeps __metadata__ in a hash map, so the header order of
    # several keys changes from run to run and the files would not be byte-reproducible.
    return tensors, {"cases": json.dumps(cases)}, meta


# ------------------------------------------------------------------------------------------------
# torch.mean probes. The vectors come from an integer formula so the C++ test can rebuild them exactly.

MEAN_SIZES = [5, 1000, 70001, 1000003, 17000003]
MEAN_RUNS = [("avx2", 1), ("avx2", 2), ("avx2", 3), ("avx512", 1), ("avx512", 2), ("avx512", 3)]


def probe_vector(n: int) -> np.ndarray:
    """u = (i * 2654435761 + 12345) mod 2^32; value = sign * (u >> 8) * 2^(e - 24) with e = (u & 31) - 16
    and sign = - when bit 5 of u is set: exact float32 values over ten decades, of both signs, so that
    the summation order shows in the result."""
    u = ((np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(12345)) & np.uint64(0xFFFFFFFF))
    mant = (u >> np.uint64(8)).astype(np.float32)
    e = (u & np.uint64(31)).astype(np.int32) - 16
    sign = np.where((u >> np.uint64(5)) & np.uint64(1), np.float32(-1), np.float32(1))
    return (sign * np.ldexp(mant, e - 24)).astype(np.float32)


def mean_worker(threads: int):
    torch.set_num_threads(threads)
    out = {}
    for n in MEAN_SIZES:
        if n > 2_000_000 and threads != 1:
            continue
        out[str(n)] = float(torch.from_numpy(probe_vector(n)).mean())
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "means": out}))


def build_means():
    tensors = {}
    for cap, threads in MEAN_RUNS:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        res = subprocess.run([sys.executable, __file__, "--mean-worker", str(threads)], env=env, check=True,
                             capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        assert r["capability"] == cap.upper() and r["threads"] == threads, r
        for n, m in r["means"].items():
            tensors[f"mean.n{n}.{cap}.threads{threads}"] = torch.tensor([m], dtype=torch.float32)
    return tensors


# ------------------------------------------------------------------------------------------------
# Linear4bit state dicts: bitsandbytes' own serialized form.

LINEARS = [  # (module name, out, in, dtype, compress_statistics, blocksize)
    ("model.layers.0.block_sparse_moe.experts.0.w1", 48, 64, torch.float32, True, 64),
    ("model.layers.0.self_attn.q_proj", 32, 128, torch.bfloat16, True, 64),
    ("model.layers.0.block_sparse_moe.gate", 8, 40, torch.float32, False, 128),
]


def build_linear4bit():
    torch.manual_seed(7)
    state, expected, notes = {}, {}, []
    for name, out_f, in_f, dtype, cs, bs in LINEARS:
        w = (torch.randn(out_f, in_f) * 0.05).to(dtype)
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=cs,
                                quant_type="nf4", quant_storage=torch.uint8)
        lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=cs, quant_type="nf4",
                                       blocksize=bs)
        lin = lin.to("cpu")  # Params4bit quantizes when it is moved to a device
        assert lin.weight.bnb_quantized
        sd = lin.state_dict(prefix=name + ".")
        state.update({k: v.contiguous() for k, v in sd.items()})
        qs = lin.weight.quant_state
        native = F.dequantize_4bit(lin.weight.data, qs)
        # The CUDA rule: float32 code * float32 absmax, then one cast to the layer dtype. The shapes above
        # keep rows whole blocks (or below the native kernel's vector width), where the native CPU kernel
        # follows it; check that, and measure the pure-torch kernel, which rounds the code table first.
        absmax = qs.absmax
        if qs.nested:
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
            absmax += qs.offset
        packed = lin.weight.data.reshape(-1)
        codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:w.numel()].long()
        cuda_rule = (F.get_4bit_type("nf4", device="cpu")[codes] * absmax.float().repeat_interleave(bs)[:w.numel()])
        cuda_rule = cuda_rule.to(dtype).reshape(w.shape)
        assert torch.equal(native.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           cuda_rule.view(torch.int16 if dtype != torch.float32 else torch.int32)), name
        torch_kernel = _dequantize_4bit_impl(lin.weight.data, absmax.float(), bs, "nf4", qs.shape, dtype)
        expected[f"{name}.weight.original"] = w.contiguous()
        expected[f"{name}.weight.dequantized"] = native.contiguous()
        notes.append({"module": name, "shape": [out_f, in_f], "dtype": str(dtype), "compress_statistics": cs,
                      "blocksize": bs, "torch_kernel_elements_differing": int((torch_kernel != native).sum()),
                      "json": bytes(sd[name + ".weight.quant_state.bitsandbytes__nf4"].numpy()).decode()})
    return state, expected, notes


# ------------------------------------------------------------------------------------------------

def write_readme(findings: dict, sizes: dict, lin_notes: list, meta: dict):
    rows = findings["cases"]
    lines = []
    for r in rows:
        cols = [r["case"], "yes" if r["codes_equal_cuda_rule"] else f"NO ({r['code_bytes_differing']} bytes)",
                "yes" if r["absmax_equal_cuda_rule"] else "NO"]
        if "qabsmax_equal_cuda_rule" in r:
            cols += ["yes" if r["qabsmax_equal_cuda_rule"] else f"NO ({r['qabsmax_differing']})",
                     "yes" if r["nested_absmax_equal_cuda_rule"] else "NO",
                     str(r["qabsmax_zero_codes"]), str(r["dequant_elements_differing_with_cuda_map"])]
        else:
            cols += ["-", "-", "-", "-"]
        cols.append(str(r["native_dequant_elements_wrong"]))
        lines.append("| " + " | ".join(cols) + " |")
    table = "\n".join(lines)
    mid = ", ".join(f"{m['x']!r} (CUDA {m['cuda']}, CPU {m['bnb_cpu']})" for m in findings["midpoint_probe"])
    ties = ", ".join(f"k={t['k']} (CUDA {t['cuda']}, CPU {t['bnb_cpu']})" for t in findings["tie8_first_differences"])
    lin = "\n".join(f"- `{n['module']}.weight`: {n['dtype']} {n['shape']}, compress_statistics={n['compress_statistics']}, "
                    f"blocksize {n['blocksize']}; JSON `{n['json']}`" for n in lin_notes)
    bf16 = next(n for n in lin_notes if "bfloat16" in n["dtype"])
    bf16_torch_kernel, bf16_numel = bf16["torch_kernel_elements_differing"], bf16["shape"][0] * bf16["shape"][1]
    files = "\n".join(f"| {k} | {v:,} |" for k, v in sizes.items())
    text = f"""# NF4 fixtures (bitsandbytes {meta['bitsandbytes']}, torch {meta['torch']}, CPU)

Made by `scripts/make_nf4_fixtures.py` (run `.venv/bin/python scripts/make_nf4_fixtures.py` from the
repository root; CPU only, about half a minute). bitsandbytes {meta['bitsandbytes']} on the CPU is the
oracle; torch's CPU kernels are pinned to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, capability seen:
{meta['aten_cpu_capability']}). Every random input comes from `torch.manual_seed`; the files are
regenerated byte for byte by a rerun on the same versions.

| file | bytes |
|---|---|
{files}

## cases.safetensors

`__metadata__["cases"]` lists every case (input, blocksize, nested, shape). Per input `NAME`:
`input.NAME` (F32, the tensor that was quantized). Per case `CASE = NAME.bs<blocksize>.<dq|plain>`:

| tensor | dtype, shape | what |
|---|---|---|
| `CASE.packed` | U8 [(n+1)/2, 1] | bitsandbytes' packed codes (first element in the high nibble) |
| `CASE.absmax` | F32 [nblocks] | plain cases: absmax per block |
| `CASE.qabsmax` | U8 [nblocks] | double-quantized cases: 8-bit code of absmax - offset |
| `CASE.nested_absmax` | F32 [ceil(nblocks/256)] | double-quantized: absmax of each nested block |
| `CASE.offset` | F32 [1] | double-quantized: mean of the block absmax |
| `CASE.dequant` | F32 (input shape) | bitsandbytes' dequantization of its own state over the flattened tensor (pure-torch kernel, finding 6) |

Shared: `nf4_code` (F32 [16], `get_4bit_type("nf4")`), `dynamic_map` (F32 [256],
`create_dynamic_map()` before any quantization), `dynamic_map_after_cpu_quantize` (the cached map after
bitsandbytes' CPU quantizer has run: entry 0 is {findings['cpu_map_entry0']!r}), and two probes:
`midpoints_1x64.*` (a block with absmax 1.0 holding every NF4 threshold and its float neighbours) and
`tie8.input` / `tie8.codes_bnb_cpu` / `tie8.absmax` (`quantize_blockwise` of 1.0 followed by the float
midpoint of every pair of neighbouring dynamic-map entries, one block of 256).

Odd element count (`normal_0p5_33x7`, n = 231): bitsandbytes 0.49.2's CPU packing raises for odd n > 3
(`quantized[::2] << 4 | quantized[1::2]` with lengths (n+1)/2 and (n-1)/2), and n = 3 broadcasts into a
wrong byte. Those cases were quantized with one 0.0 appended, which is what the CUDA kernel does: it
loads past the end as 0.0 inside the same block (absmax unchanged) and stores (n+1)/2 bytes, so the pad
nibble is the code of 0 * (1/absmax) = 7 (0 in an all-zero block), not a zero nibble.

## torch_mean.safetensors

`mean.n<N>.<capability>.threads<T>` (F32 [1]): `torch.mean` of the float32 vector with elements
u = (i * 2654435761 + 12345) mod 2^32, x[i] = sign * (u >> 8) * 2^((u & 31) - 16 - 24), sign negative
when bit 5 of u is set (i = 0..N-1; exact float32 values), with `ATEN_CPU_CAPABILITY` avx2 or
avx512 and T threads (N > 2,000,000 only with T = 1). The capability does not matter (torch registers
no AVX-512 sum kernel, so the AVX2 one with 8-float vectors runs), the thread count does for
N >= 32768. moelab reproduces the single-thread order to match bitsandbytes' double-quantization offset.

## linear4bit_state_dict.safetensors / linear4bit_expected.safetensors

`Linear4bit(...).to("cpu").state_dict(prefix=MODULE + ".")` for three layers, saved with
`safetensors.torch.save_file` (metadata `{{"format": "pt"}}`), i.e. the serialized form transformers 4.x
writes for a bnb-4bit checkpoint:
{lin}

`linear4bit_expected.safetensors` holds `MODULE.weight.original` (the weight before quantization, in its
dtype) and `MODULE.weight.dequantized` (`dequantize_4bit`, in the layer's dtype).

## bitsandbytes {meta['bitsandbytes']} CPU vs the CUDA rules (measured here)

Each case was also quantized by a NumPy transcription of the CUDA kernels (`cuda_nf4_codes`,
`cuda_blockwise8` in the script). "qabsmax" compares the 8-bit codes of (absmax - offset) with
bitsandbytes' own offset; "code-0 absmax" counts blocks whose absmax got 8-bit code 0; the last column
but one counts dequantized elements that change when code 0 is rebuilt with the CUDA map entry instead
of -1.0; the last counts elements where bitsandbytes' native CPU `dequantize_4bit` differs from the
flat (CUDA) rule (finding 6). The stored `CASE.dequant` always follows the flat rule.

| case | 4-bit codes = CUDA | absmax = CUDA | qabsmax = CUDA | nested absmax = CUDA | code-0 absmax | dequant elements differing | native dequant wrong |
|---|---|---|---|---|---|---|---|
{table}

Differences found, each named in tests/test_nf4.cpp:
1. **Odd n**: see above (CPU raises; CUDA pads with the code of 0.0, i.e. nibble 7).
2. **Exact NF4 thresholds**: the CPU path takes `argmin |x - code|` in float32, the kernel compares with
   `>` against its float constants (as nvcc rounds the literals; 4 of them, indices 0, 8, 12 and 14,
   are one ulp away from the float midpoint of their two codes). At {len(findings['midpoint_probe'])} of
   the 15 constants the value exactly on it gets the upper code on the CPU and the lower code on CUDA:
   {mid}. Neighbouring floats agree.
3. **8-bit map entry 0**: `csrc/cpu_ops.cpp::quantize_cpu` writes `code[0] = -1.0f` into the map it is
   given, which is bitsandbytes' cached `create_dynamic_map()`; the QuantState (and so the serialized
   `nested_quant_map`) keeps the changed map. On CUDA entry 0 is {findings['fresh_map_entry0']!r}. A block
   whose absmax gets 8-bit code 0 is therefore rebuilt differently, and values in
   (-0.98945, -0.98594] after scaling pick code 0 on CUDA and code 1 on the CPU. Readers must use the
   stored `nested_quant_map`; moelab's quantizer writes the CUDA map.
4. **8-bit ties**: the CPU lookup breaks exact ties toward the lower index and compares float
   distances; the CUDA `dQuantize` keeps its search pivot, always the even index of the pair. On the
   tie probe {findings['tie8_differing']} of 256 codes differ, e.g. {ties}.
5. Not measurable here, derived from the code: bitsandbytes' CUDA build uses `--use_fast_math`, so the
   kernel's `1.0f / absmax` is an approximate reciprocal (≤ 1 ulp) and subnormals flush to zero; a value
   whose `x * inv` lies within an ulp of a threshold can get the neighbouring code on a GPU. moelab uses
   the IEEE reciprocal (what the CPU path does). The double-quantization offset on CUDA is torch's GPU
   mean (another summation order, then `* (1/n)`), so it can differ from the CPU's in the last bits.
   NaN inputs: CUDA's `fmaxf` ignores NaN in absmax, the CPU's `max` propagates it; moelab rejects
   non-finite inputs.
6. **Native CPU dequantize_4bit on AVX-512**: `cdequantize_blockwise_cpu_nf4_*` treats the tensor as
   [rows, cols] and takes block `row * (cols / blocksize) + col / blocksize` (integer division) when
   cols % 16 == 0, so it is wrong whenever a row is not a whole number of blocks (e.g. [128, 96] with
   blocksize 64; the last column of the table). bitsandbytes sends only float32/float16 outputs with blocksize >= 2048
   and odd column counts to its pure-torch kernel. Mixtral's matrices (4096 / 14336 columns) are not
   affected. `CASE.dequant` is therefore made with the pure-torch kernel (`dequantize_flat` in the
   script), which for float32 output is the flat CUDA rule.
7. **Pure-torch dequantize for 16-bit outputs**: `backends/default/ops.py::_dequantize_4bit_impl` rounds
   the NF4 table to the output dtype before multiplying (`CODE.to(dtype)`), where CUDA multiplies in
   float32 and rounds once. For the bfloat16 layer above it gives {bf16_torch_kernel} of
   {bf16_numel} elements differently from the native/CUDA result that `linear4bit_expected` stores.
"""
    (OUT / "README.md").write_text(text)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--mean-worker":
        mean_worker(int(sys.argv[2]))
        return
    if bnb.__version__ != BNB_VERSION or not torch.__version__.startswith(TORCH_VERSION):
        sys.exit(f"need bitsandbytes {BNB_VERSION} and torch {TORCH_VERSION}, found {bnb.__version__} / {torch.__version__}")
    assert torch.backends.cpu.get_cpu_capability() == "AVX2", torch.backends.cpu.get_cpu_capability()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)

    findings = {}
    tensors, file_meta, meta = build_cases(findings)
    save_file(tensors, str(OUT / "cases.safetensors"), metadata=file_meta)
    save_file(build_means(), str(OUT / "torch_mean.safetensors"),
              metadata={"formula": probe_vector.__doc__.strip()})
    state, expected, lin_notes = build_linear4bit()
    save_file(state, str(OUT / "linear4bit_state_dict.safetensors"), metadata={"format": "pt"})
    save_file(expected, str(OUT / "linear4bit_expected.safetensors"),
              metadata={"modules": json.dumps(lin_notes)})

    names = ["cases.safetensors", "torch_mean.safetensors", "linear4bit_state_dict.safetensors",
             "linear4bit_expected.safetensors"]
    sizes = {n: (OUT / n).stat().st_size for n in names}
    write_readme(findings, sizes, lin_notes, meta)
    print(json.dumps(findings, indent=1)[:6000])
    print(sizes, "total", sum(sizes.values()))


if __name__ == "__main__":
    main()
