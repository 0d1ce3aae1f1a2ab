"""x86 SIMD building blocks for the 4-bit CPU kernels, as Numba intrinsics (LLVM IR).

A 4-bit code indexes a 16-entry table; a register permute (``vpermps``) looks up 8 or 16
of them in one instruction, which no auto-vectorizer emits for a table lookup. Both
intrinsics here decode ``width`` packed bytes into the two vectors t[q_hi], t[q_lo] of the
block's table t = code·c_b (an IEEE float32 product, no fast-math flag: the same value as
``code[q] * c_b`` element by element):

    width 16 (AVX-512F): t[q] = vpermps(t, q)
    width 8 (AVX2):      t[q] = q > 7 ? vpermps(t[8:16], q) : vpermps(t[0:8], q)

:func:`simd_width` says which one the CPU supports (0: none, or JIT disabled); the kernels
fall back to portable loops then. The intrinsics are only compiled when called.
"""

from __future__ import annotations

import functools
from typing import Any

from numba import config, types
from numba.extending import intrinsic

__all__ = ["make_dequant_chunk", "make_gemv_chunk", "simd_width"]


@functools.cache
def simd_width() -> int:
    """Lanes of the permute kernel on this CPU: 16 (AVX-512F), 8 (AVX2+FMA) or 0 (none)."""
    if config.DISABLE_JIT or config.CPU_NAME not in (None, "host"):
        return 0  # no compiled code, or a generic/other target that may lack the instruction
    try:
        from llvmlite import binding as llvm

        feats = llvm.get_host_cpu_features()
    except Exception:  # pragma: no cover - llvmlite always has it on x86
        return 0
    if feats.get("avx512f", False):
        return 16
    if feats.get("avx2", False) and feats.get("fma", False):
        return 8
    return 0


def _decode(
    context: Any, builder: Any, tys: Any, width: int, pk: tuple, code: tuple, scale: Any
) -> tuple[Any, Any, Any]:
    """Emit: t = code·c, the ``width`` bytes at pk, (t[q_hi], t[q_lo], ptr helper)."""
    from llvmlite import ir
    from numba.core import cgutils

    f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
    vf, vi, vb = ir.VectorType(f32, width), ir.VectorType(i32, width), ir.VectorType(i8, width)
    v16f, v8f, v8i = ir.VectorType(f32, 16), ir.VectorType(f32, 8), ir.VectorType(i32, 8)
    mod = builder.module

    def ptr(k: int, ary: Any, off: Any, vty: Any) -> Any:
        data = context.make_array(tys[k])(context, builder, ary).data
        return builder.bitcast(builder.gep(data, [off]), vty.as_pointer())

    zero = ir.Constant(ir.IntType(64), 0)
    bytes_ = builder.load(ptr(pk[0], pk[1], pk[2], vb), align=1)
    w = builder.zext(bytes_, vi)
    hi = builder.lshr(w, ir.Constant(vi, [4] * width))  # first element: high nibble
    lo = builder.and_(w, ir.Constant(vi, [15] * width))
    code_v = builder.load(ptr(code[0], code[1], zero, v16f), align=4)
    sc16 = builder.insert_element(v16f(ir.Undefined), scale, i32(0))
    sc16 = builder.shuffle_vector(
        sc16, v16f(ir.Undefined), ir.Constant(ir.VectorType(i32, 16), [0] * 16)
    )
    table = builder.fmul(code_v, sc16)  # t = code·c_b (16 levels, IEEE product)
    if width == 16:
        perm = cgutils.get_or_insert_function(
            mod, ir.FunctionType(vf, [vf, vi]), "llvm.x86.avx512.permvar.sf.512"
        )

        def lut(idx: Any) -> Any:
            return builder.call(perm, [table, idx])  # t[q], one permute
    else:
        perm = cgutils.get_or_insert_function(
            mod, ir.FunctionType(v8f, [v8f, v8i]), "llvm.x86.avx2.permps"
        )
        t_lo = builder.shuffle_vector(table, v16f(ir.Undefined), ir.Constant(v8i, list(range(8))))
        t_hi = builder.shuffle_vector(
            table, v16f(ir.Undefined), ir.Constant(v8i, list(range(8, 16)))
        )
        seven = ir.Constant(vi, [7] * width)

        def lut(idx: Any) -> Any:  # t[q]: permute both halves, select on q > 7
            a = builder.call(perm, [t_lo, idx])
            b = builder.call(perm, [t_hi, idx])
            return builder.select(builder.icmp_unsigned(">", idx, seven), b, a)

    return lut(hi), lut(lo), ptr


def make_gemv_chunk(width: int) -> Any:
    """An intrinsic adding t[q]·x for ``width`` packed bytes to ``acc`` (GEMV step).

    chunk(acc, slot, packed, p_off, xe, xo, x_off, code, scale):
        t      = code · scale                              (16 levels, float32)
        q_hi_j = packed[p_off + j] >> 4, q_lo_j = … & 15   (j < width)
        acc[slot : slot+width] += t[q_hi]·xe[x_off:…] + t[q_lo]·xo[x_off:…]   (two FMAs)
    xe, xo: the even and odd items of x (the high and low nibbles' partners).
    """
    from llvmlite import ir
    from numba.core import cgutils

    vf = ir.VectorType(ir.FloatType(), width)

    @intrinsic
    def chunk(
        typingctx: Any,
        acc: Any,
        slot: Any,
        packed: Any,
        p_off: Any,
        xe: Any,
        xo: Any,
        x_off: Any,
        code: Any,
        scale: Any,
    ) -> Any:
        sig = types.void(acc, types.intp, packed, types.intp, xe, xo, types.intp, code, scale)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            acc_a, slot_v, pk_a, pk_off, xe_a, xo_a, x_off_v, code_a, scale_v = args
            tys = signature.args
            th, tl, ptr = _decode(
                context, builder, tys, width, (2, pk_a, pk_off), (7, code_a), scale_v
            )
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{width}f32"
            )
            pacc = ptr(0, acc_a, slot_v, vf)
            a = builder.load(pacc, align=4)
            a = builder.call(fma, [th, builder.load(ptr(4, xe_a, x_off_v, vf), align=4), a])
            a = builder.call(fma, [tl, builder.load(ptr(5, xo_a, x_off_v, vf), align=4), a])
            builder.store(a, pacc, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return chunk


def make_dequant_chunk(width: int) -> Any:
    """An intrinsic writing the 2·width values of ``width`` packed bytes (dequantization).

    chunk(out, o_off, packed, p_off, code, scale):
        out[o_off + 2j] = t[q_hi_j],  out[o_off + 2j + 1] = t[q_lo_j],  t = code·scale
    (the two lookups interleaved by one shuffle and stored as one vector of 2·width floats).
    """
    from llvmlite import ir

    mask = ir.Constant(
        ir.VectorType(ir.IntType(32), 2 * width), [k for j in range(width) for k in (j, width + j)]
    )
    v2f = ir.VectorType(ir.FloatType(), 2 * width)

    @intrinsic
    def chunk(
        typingctx: Any, out: Any, o_off: Any, packed: Any, p_off: Any, code: Any, scale: Any
    ) -> Any:
        sig = types.void(out, types.intp, packed, types.intp, code, scale)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            out_a, o_off_v, pk_a, pk_off, code_a, scale_v = args
            tys = signature.args
            th, tl, ptr = _decode(
                context, builder, tys, width, (2, pk_a, pk_off), (4, code_a), scale_v
            )
            pair = builder.shuffle_vector(th, tl, mask)  # x̂_{2j} = t[q_hi], x̂_{2j+1} = t[q_lo]
            builder.store(pair, ptr(0, out_a, o_off_v, v2f), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return chunk
