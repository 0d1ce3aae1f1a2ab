"""x86 SIMD building blocks for the 4-bit CPU kernels, as Numba intrinsics (LLVM IR).

A 4-bit code indexes a 16-entry table; a register permute (``vpermps``) looks up 8 or 16
of them in one instruction, which no auto-vectorizer emits for a table lookup:

    width 16 (AVX-512F): t[q] = vpermps(t, q)                   (reads bits 0–3 of q)
    width 8 (AVX2):      t[q] = q & 8 ? vpermps(t[8:16], q) : vpermps(t[0:8], q)

``make_dequant_chunk`` decodes ``width`` packed bytes into t[q_hi], t[q_lo] of the block's
table t = code·c_b (an IEEE float32 product, no fast-math flag: the same value as
``code[q] * c_b`` element by element) and stores them interleaved. ``make_gemv_group``
reads the codes as 32-bit words (8 nibbles per lane) for the fused GEMV.

:func:`simd_width` says which one the CPU supports (0: none, or JIT disabled); the kernels
fall back to portable loops then. The intrinsics are only compiled when called.
"""

from __future__ import annotations

import functools
from typing import Any

from numba import config, types
from numba.extending import intrinsic

__all__ = ["NIBBLE_SHIFT", "make_dequant_chunk", "make_gemv_group", "simd_width"]


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


# nibble of element e (0..7) inside a little-endian 32-bit word of 4 packed bytes: byte e//2,
# high nibble first → bit offset 8·(e//2) + 4·(1 − e%2)
NIBBLE_SHIFT = (4, 0, 12, 8, 20, 16, 28, 24)


def make_gemv_group(width: int, n_groups: int = 1) -> Any:
    """An intrinsic for ``n_groups`` GEMV groups of 4·width packed bytes = 8·width weights.

    group(acc, slot, packed, p_off, xp, x_off, code, sc, g0, bshift, sidx), for each group
    h < n_groups (g = g0 + h, its codes at p_off + 4·width·h, its x at x_off + width·h):
        w_k   = 32-bit word k of the group's codes               (lane k: weights 8k…8k+7)
        part  = Σ_{e<8} code[(w >> shift_e) & 15] · xp[e, x_off : x_off + width]
        acc[slot + width·h : …+width] += sc[(g·8·width >> bshift) + sidx] · part
    (sc[… + sidx]: lane k's block scale, B = 2^bshift; n_groups > 1 gives the out-of-order
    core independent groups per call.)
    xp[e, g·width + k] = x[g·8·width + 8k + e]: x regrouped once per call so that each of
    the 8 nibble positions of a word meets its x in the same lane. The 16-entry lookup
    ignores the bits above the nibble (AVX-512: ``vpermps`` reads bits 0–3; AVX2: bits 0–2
    and a select on bit 3), so a shift is all a nibble costs; 8 permutes and 8 FMAs per
    8·width weights, the block scales applied once per group by a permute of the row's
    scales.
    """
    from llvmlite import ir
    from numba.core import cgutils

    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    vf, vi = ir.VectorType(f32, width), ir.VectorType(i32, width)
    v8f, v8i = ir.VectorType(f32, 8), ir.VectorType(i32, 8)

    @intrinsic
    def group(
        typingctx: Any,
        acc: Any,
        slot: Any,
        packed: Any,
        p_off: Any,
        xp: Any,
        x_off: Any,
        code: Any,
        sc: Any,
        g0: Any,
        bshift: Any,
        sidx: Any,
    ) -> Any:
        sig = types.void(
            acc, types.intp, packed, types.intp, xp, types.intp, code, sc, types.intp,
            types.intp, sidx,
        )  # fmt: skip

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            acc_a, slot_v, pk_a, pk_off, xp_a, x_off_v, code_a, sc_a, g0_v, bsh_v, sidx_a = args
            tys = signature.args

            def ptr(k: int, ary: Any, off: Any, vty: Any) -> Any:
                data = context.make_array(tys[k])(context, builder, ary).data
                return builder.bitcast(builder.gep(data, [off]), vty.as_pointer())

            zero = i64(0)
            mod = builder.module
            fma = cgutils.get_or_insert_function(
                mod, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{width}f32"
            )
            if width == 16:
                perm16 = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(vf, [vf, vi]), "llvm.x86.avx512.permvar.sf.512"
                )
                table = builder.load(ptr(6, code_a, zero, vf), align=4)

                def lut(tab: Any, idx: Any) -> Any:  # tab[idx & 15]
                    return builder.call(perm16, [tab, idx])

                def lut_small(tab: Any, idx: Any) -> Any:
                    return builder.call(perm16, [tab, idx])
            else:
                perm8 = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(v8f, [v8f, v8i]), "llvm.x86.avx2.permps"
                )
                t_lo = builder.load(ptr(6, code_a, zero, v8f), align=4)
                t_hi = builder.load(ptr(6, code_a, i64(8), v8f), align=4)
                table = (t_lo, t_hi)
                eight, nil = ir.Constant(vi, [8] * width), ir.Constant(vi, [0] * width)

                def lut(tab: Any, idx: Any) -> Any:  # idx & 8 ? t_hi[idx & 7] : t_lo[idx & 7]
                    a = builder.call(perm8, [tab[0], idx])
                    b = builder.call(perm8, [tab[1], idx])
                    bit3 = builder.icmp_unsigned("!=", builder.and_(idx, eight), nil)
                    return builder.select(bit3, b, a)

                def lut_small(tab: Any, idx: Any) -> Any:  # idx < 8
                    return builder.call(perm8, [tab, idx])

            xpa = context.make_array(tys[4])(context, builder, xp_a)
            stride = cgutils.unpack_tuple(builder, xpa.strides, 2)[0]  # bytes per row of xp
            xbase = builder.bitcast(xpa.data, ir.IntType(8).as_pointer())
            sid = builder.load(ptr(10, sidx_a, zero, vi), align=4)
            for h in range(n_groups):
                p_h = builder.add(pk_off, i64(4 * width * h))
                words = builder.load(ptr(2, pk_a, p_h, vi), align=1)
                x_byte = builder.mul(builder.add(x_off_v, i64(width * h)), i64(4))
                parts = [ir.Constant(vf, [0.0] * width), ir.Constant(vf, [0.0] * width)]
                for e, sh in enumerate(NIBBLE_SHIFT):
                    idx = builder.lshr(words, ir.Constant(vi, [sh] * width)) if sh else words
                    off = builder.add(builder.mul(stride, i64(e)), x_byte)
                    xptr = builder.bitcast(builder.gep(xbase, [off]), vf.as_pointer())
                    xv = builder.load(xptr, align=4)
                    parts[e & 1] = builder.call(fma, [lut(table, idx), xv, parts[e & 1]])
                part = builder.fadd(parts[0], parts[1])
                g_h = builder.add(g0_v, i64(h))
                s_off = builder.lshr(builder.mul(g_h, i64(8 * width)), bsh_v)  # g·gw // B
                scv = builder.load(ptr(7, sc_a, s_off, vf), align=4)
                lane_scale = lut_small(scv, sid)  # c_b of each lane's block
                pacc = ptr(0, acc_a, builder.add(slot_v, i64(width * h)), vf)
                acc_v = builder.call(fma, [lane_scale, part, builder.load(pacc, align=4)])
                builder.store(acc_v, pacc, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return group


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
